"""Convert checkpoints to and from HuggingFace transformers and GenSLM.

Export the newest checkpoint of a model_dir (or --checkpoint_path) to a transformers directory
(GPT2LMHeadModel, GPTJForCausalLM, GPTNeoXForCausalLM, BertForMaskedLM or
BertForSequenceClassification); --pytorch_bin adds pytorch_model.bin for code that reads no
safetensors (such as GenSLM's transformers fork):

    python -m modelzoo.tools.convert_checkpoint --to hf --model_dir MD [--checkpoint_path C] --output_dir OUT \
        [--pytorch_bin]

Export a GPT-NeoX checkpoint as the weights file GenSLM's own loader reads (``GenSLM`` in
genslm/inference.py: a dict whose ``state_dict`` holds the GPTNeoXForCausalLM's tensors under
transformers 4.x's unprefixed names, with the attention buffers GenSLM's released files keep), and
with --config also its architecture file in GenSLM's format:

    python -m modelzoo.tools.convert_checkpoint --to genslm --model_dir MD --output_path F.pt [--config F.json]

Import a transformers directory as checkpoint_0 of a new model_dir that training resumes from
(the params' model section must describe the same network):

    python -m modelzoo.tools.convert_checkpoint --from hf --input_dir IN --params P --model_dir MD

Import a GenSLM checkpoint (a PyTorch Lightning .pt, GenSLM's unprefixed inference weights, or a
DeepSpeed fp32 state dict holding a GPTNeoXForCausalLM; read without running any code from the
pickle) with its architecture file; MD also gets params_genslm.yaml (dropout 0, as GenSLM's models):

    python -m modelzoo.tools.convert_checkpoint --from genslm --input_path CKPT.pt --config ARCH.json --model_dir MD

Fold a LoRA run's adapters into its weights (W + alpha / r B A) and write the merged model as a
new model_dir: its checkpoint at the same step (no optimizer state: the adapters' is moot) and
params_merged.yaml, the params without model.lora, from which run.py trains the whole model on:

    python -m modelzoo.tools.convert_checkpoint --merge_lora --model_dir MD [--checkpoint_path C] --output_dir OUT

--to hf and --to genslm fold a LoRA checkpoint's adapters the same way before they export it.

OUT gets config.json, model.safetensors and tokenizer.json / tokenizer_config.json, which
``AutoModelFor*.from_pretrained(OUT)`` and ``PreTrainedTokenizerFast.from_pretrained(OUT)`` load;
OUT appears complete or not at all, and --overwrite replaces an earlier export only, never a
directory holding anything else.
Export then import gives back the same tensors bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from modelzoo.config import ModelConfig, Params, load_params
from modelzoo.entry import OneLineParser, run_entry
from modelzoo.errors import CheckpointError, ConfigError, UserError
from modelzoo.files import check_output_dir, check_output_file, output_file
from modelzoo.files import output_dir as output_dir_of
from modelzoo.models import MODELS, build_model, hf
from modelzoo.tools.common import model_inputs
from modelzoo.training import checkpoint as ckpt

PROG = "python -m modelzoo.tools.convert_checkpoint"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      epilog="examples:\n  " + "\n  ".join(_examples()),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=["hf", "genslm"],
                     help="export a checkpoint to a transformers directory, or to GenSLM's weights file")
    way.add_argument("--from", dest="from_", choices=["hf", "genslm"],
                     help="import a transformers directory, or a GenSLM Lightning checkpoint, as checkpoint_0")
    way.add_argument("--merge_lora", action="store_true",
                     help="fold a LoRA checkpoint's adapters into its weights: a new model_dir (--output_dir)")
    p.add_argument("--model_dir", required=True, help="--to, --merge_lora: read its newest checkpoint; --from: write "
                                                      "checkpoint_0 here (must hold no checkpoint yet)")
    p.add_argument("--checkpoint_path", help="--to, --merge_lora: read this checkpoint instead of the newest in "
                                             "model_dir")
    p.add_argument("--output_dir", help="--to hf: the transformers directory to write; --merge_lora: the merged "
                                        "model_dir (must not exist or be empty, or be an earlier output of the same "
                                        "kind with --overwrite)")
    p.add_argument("--output_path", help="--to genslm: the .pt file to write")
    p.add_argument("--overwrite", action="store_true", help="--to, --merge_lora: replace an earlier output of this "
                                                            "tool")
    p.add_argument("--pytorch_bin", action="store_true", help="--to hf: also write pytorch_model.bin")
    p.add_argument("--input_dir", help="--from: the transformers directory to read")
    p.add_argument("--params", help="--from hf: params yaml whose model section matches the transformers config")
    p.add_argument("--input_path", help="--from genslm: GenSLM's .pt checkpoint (read without running code from it)")
    p.add_argument("--config", help="--from genslm: its architecture file, e.g. GenSLM's neox_25,290,752.json; "
                                    "--to genslm: write the architecture file here")
    return p


def _examples() -> list[str]:
    return [f"{PROG} --to hf --model_dir model_dir/run1 --output_dir hf/run1",
            f"{PROG} --to genslm --model_dir model_dir/genslm_25M --output_path genslm_25M.pt",
            f"{PROG} --merge_lora --model_dir model_dir/lora_run --output_dir model_dir/lora_run_merged",
            f"{PROG} --from hf --input_dir hf/run1 --params configs/genslm/gptj_25M_msl2048.yaml "
            "--model_dir model_dir/run2",
            f"{PROG} --from genslm --input_path patric_25m_epoch01.pt --config 'neox_25,290,752.json' "
            "--model_dir model_dir/genslm_25M"]


def _inputs(model_dir: str, checkpoint_path: str | None) -> list[Path]:
    """What an export reads, which its output may be none of: the model_dir and every checkpoint
    in it (with seals), symbolic links resolved (the inference tools' rule)."""
    return model_inputs(argparse.Namespace(model_dir=model_dir, checkpoint_path=checkpoint_path))


def _exported(model_dir: str, checkpoint_path: str | None) -> tuple[Path, dict, dict, ModelConfig]:
    """The checkpoint to export, its state, its raw params and its model config."""
    path = Path(checkpoint_path) if checkpoint_path else ckpt.newest_good_checkpoint(model_dir)
    if path is None:
        raise CheckpointError(f"{model_dir}: no checkpoint to export (train first or pass --checkpoint_path)")
    state = ckpt.load_checkpoint(path)
    if "params" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a model checkpoint (no params or model state)")
    raw = yaml.safe_load(state["params"])
    return path, state, raw, ModelConfig.model_validate(raw["model"])


def _merged(path: Path, state: dict, raw: dict, cfg: ModelConfig) -> tuple[dict, dict, ModelConfig]:
    """A LoRA checkpoint's state, raw params and model config with its adapters folded into the
    weights (the model without model.lora); any other checkpoint's as they are."""
    if cfg.lora is None:
        return state, raw, cfg
    from modelzoo.models import lora
    model = lora.merged_state(state["model"], cfg.lora, str(path))
    with torch.device("meta"):
        plain = cfg.model_copy(update={"lora": None})
        expected = {k: v.shape for k, v in build_model(plain).state_dict().items()}
    ckpt.check_model_state(path, model, expected)
    raw = {**raw, "model": {k: v for k, v in raw["model"].items() if k != "lora"}}
    return {**state, "model": model}, raw, plain


def export(model_dir: str, checkpoint_path: str | None, output_dir: str, overwrite: bool = False,
           pytorch_bin: bool = False) -> str:
    out = Path(output_dir)
    inputs = _inputs(model_dir, checkpoint_path)
    check_output_dir(out, hf.EXPORT_TOOL, overwrite, inputs)  # before the checkpoint is read
    path, state, raw, cfg = _exported(model_dir, checkpoint_path)
    state, raw, cfg = _merged(path, state, raw, cfg)
    hf.save_hf(out, cfg, state["model"], label_names=_label_names(raw), overwrite=overwrite, inputs=inputs,
               pytorch_bin=pytorch_bin)
    return f"wrote {hf.architecture(cfg)} from {path} to {out}"


GENSLM_TOOL = "modelzoo.tools.convert_checkpoint --to genslm"  # the owner its output markers name


def export_genslm(model_dir: str, checkpoint_path: str | None, output_path: str, config_path: str | None = None,
                  overwrite: bool = False) -> str:
    """A GPT-NeoX checkpoint -> GenSLM's weights file (and its architecture file)."""
    from modelzoo.models import genslm

    inputs = _inputs(model_dir, checkpoint_path)
    outputs = [(output_path, "--output_path")] + ([(config_path, "--config")] if config_path else [])
    for target, flag in outputs:  # refused before the checkpoint is read
        check_output_file(target, GENSLM_TOOL, overwrite, inputs, flag)
    path, state, raw, cfg = _exported(model_dir, checkpoint_path)
    state, _, cfg = _merged(path, state, raw, cfg)
    if cfg.name != "gpt_neox":
        raise ConfigError(f"{path}: --to genslm needs a gpt_neox checkpoint (GenSLM's models are GPT-NeoX); "
                          f"this is {cfg.name} (use --to hf)")
    content = {"state_dict": genslm.genslm_state(cfg, hf.to_hf_state(cfg, state["model"])),
               "global_step": int(state.get("step") or 0)}
    with output_file(output_path, GENSLM_TOOL, overwrite, "wb", inputs, "--output_path") as f:
        torch.save(content, f)
    if config_path:
        with output_file(config_path, GENSLM_TOOL, overwrite, "w", inputs, "--config") as f:
            f.write(json.dumps(genslm.architecture_json(cfg), indent=4) + "\n")
    also = f" and its architecture file {config_path}" if config_path else ""
    return f"wrote GenSLM weights ({cfg.name}, step {content['global_step']}) from {path} to {output_path}{also}"


MERGE_TOOL = "modelzoo.tools.convert_checkpoint --merge_lora"  # the owner its output directories name


def merge_lora(model_dir: str, checkpoint_path: str | None, output_dir: str, overwrite: bool = False) -> str:
    """A LoRA checkpoint -> a new model_dir holding the merged model at the same step."""
    inputs = _inputs(model_dir, checkpoint_path)
    with output_dir_of(output_dir, MERGE_TOOL, overwrite, inputs) as tmp:  # refused before any reading
        path, state, raw, cfg = _exported(model_dir, checkpoint_path)
        if cfg.lora is None:
            raise ConfigError(f"{path}: its params have no model.lora: there are no adapters to merge")
        from modelzoo.models.lora import adapter_layers
        layers = len(adapter_layers(state["model"]))
        state, raw, _ = _merged(path, state, raw, cfg)
        raw = {**raw, "runconfig": {**(raw.get("runconfig") or {}), "model_dir": str(output_dir)}}
        params = yaml.safe_dump(raw, sort_keys=False)
        # the adapters' optimizer state has no use in the merged model: training it starts afresh
        merged = {k: v for k, v in state.items() if k not in ("optimizer", "loss_scale")}
        step = int(state.get("step") or 0)
        ckpt.save_checkpoint(tmp, step, {**merged, "params": params})
        (tmp / "params_merged.yaml").write_text(params)
    return f"wrote {ckpt.checkpoint_path(output_dir, step)} and params_merged.yaml from {path}: the adapters " \
           f"of {layers} layers folded into their weights"


def _label_names(raw_params: dict) -> list[str] | None:
    """Class names of a classifier, read from its training labels file when it is still there."""
    from modelzoo.data.datasets import read_label_table
    section = raw_params.get("train_input") or {}
    key = MODELS[raw_params["model"]["name"]].classifier_key
    if not (key and raw_params["model"].get(key)) or not section.get("labels_file"):
        return None
    try:
        return read_label_table(section["labels_file"], section["label_column"], section.get("id_column"))[1]
    except UserError:
        return None  # the class names are a nicety of config.json; the weights do not need them


def import_(input_dir: str, params_path: str, model_dir: str) -> str:
    params: Params = load_params(params_path, {"model_dir": model_dir}, check_paths=False)
    _refuse_used(model_dir)
    config, theirs = hf.read_hf(Path(input_dir))
    source = str(Path(input_dir) / "config.json")
    hf.check_matches(params.model, hf.model_fields_from_hf(config, source), source)
    ours, unused = hf.from_hf_state(params.model, theirs, str(input_dir))
    path = _write_imported(params, ours, input_dir)
    note = f" (ignored {len(unused)} tensors: {', '.join(unused[:5])})" if unused else ""
    return f"wrote {path} from {input_dir}{note}"


def import_genslm(input_path: str, config_path: str, model_dir: str) -> str:
    """A GenSLM checkpoint in any layout it has (read without running code from it) and its
    architecture file -> checkpoint_0 plus params_genslm.yaml (the model section) in model_dir."""
    from modelzoo.files import write_file_atomically
    from modelzoo.models import genslm

    _refuse_used(model_dir)
    arch = genslm.read_architecture(config_path)
    found = genslm.read_checkpoint(input_path)
    genslm.check_width(arch, found, config_path)
    params = genslm.params_of(arch, str(config_path), model_dir)
    found.require(hf.hf_names(params.model))
    ours, unused = hf.from_hf_state(params.model, found.tensors, str(input_path))
    if unused:
        raise CheckpointError(f"{input_path}: tensor {found.layout.prefix + unused[0]!r} is not part of the network "
                              f"in {config_path} ({len(unused)} unused): checkpoint and architecture file differ")
    path = _write_imported(params, ours, input_path)
    write_file_atomically(Path(model_dir) / "params_genslm.yaml", params.to_yaml())
    n = sum(t.numel() for t in ours.values())
    return (f"wrote {path} ({params.model.name}, {n:,} parameters; {found.layout.name}) and params_genslm.yaml "
            f"from {input_path}")


def _refuse_used(model_dir: str) -> None:
    if ckpt.list_checkpoints(model_dir):
        raise ConfigError(f"--model_dir {model_dir}: already holds checkpoints; import into an empty model_dir")


def _write_imported(params: Params, ours: dict, source) -> Path:
    """``ours`` (checked against the params' network) as checkpoint_0 of params' model_dir, the
    step training resumes or fine-tunes from."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_model(params.model).state_dict().items()}
    ckpt.check_model_state(source, ours, expected)
    torch.manual_seed(params.runconfig.seed)
    state = ckpt.training_state({"model": ours}, 0, params)
    model_dir = Path(params.runconfig.model_dir)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--model_dir {model_dir}: cannot write ({e.strerror or e})") from None
    return ckpt.save_checkpoint(model_dir, 0, state)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    way = f"--to {args.to}" if args.to else f"--from {args.from_}" if args.from_ else "--merge_lora"
    needed = {"--to hf": ["output_dir"], "--to genslm": ["output_path"], "--from hf": ["input_dir", "params"],
              "--from genslm": ["input_path", "config"], "--merge_lora": ["output_dir"]}[way]
    missing = [f"--{k}" for k in needed if getattr(args, k) is None]
    if missing:
        parser.error(f"{way} needs {' and '.join(missing)}")
    if args.merge_lora:
        return run_entry(lambda: merge_lora(args.model_dir, args.checkpoint_path, args.output_dir, args.overwrite))
    if args.to == "genslm":
        return run_entry(lambda: export_genslm(args.model_dir, args.checkpoint_path, args.output_path, args.config,
                                               args.overwrite))
    if args.to:
        return run_entry(lambda: export(args.model_dir, args.checkpoint_path, args.output_dir, args.overwrite,
                                        args.pytorch_bin))
    if args.from_ == "genslm":
        return run_entry(lambda: import_genslm(args.input_path, args.config, args.model_dir))
    return run_entry(lambda: import_(args.input_dir, args.params, args.model_dir))


if __name__ == "__main__":
    sys.exit(main())
