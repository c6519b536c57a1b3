"""Convert checkpoints to and from HuggingFace transformers, and import GenSLM's released models.

Export the newest checkpoint of a model_dir (or --checkpoint_path) to a transformers directory
(GPT2LMHeadModel, GPTJForCausalLM, GPTNeoXForCausalLM, BertForMaskedLM or
BertForSequenceClassification):

    python -m modelzoo.tools.convert_checkpoint --to hf --model_dir MD [--checkpoint_path C] --output_dir OUT

Import a transformers directory as checkpoint_0 of a new model_dir that training resumes from
(the params' model section must describe the same network):

    python -m modelzoo.tools.convert_checkpoint --from hf --input_dir IN --params P --model_dir MD

Import a GenSLM checkpoint (a PyTorch Lightning .pt holding a GPTNeoXForCausalLM; read without
running any code from the pickle) with its architecture file; MD also gets params_genslm.yaml:

    python -m modelzoo.tools.convert_checkpoint --from genslm --input_path CKPT.pt --config ARCH.json --model_dir MD

OUT gets config.json, model.safetensors and tokenizer.json / tokenizer_config.json, which
``AutoModelFor*.from_pretrained(OUT)`` and ``PreTrainedTokenizerFast.from_pretrained(OUT)`` load;
OUT appears complete or not at all, and --overwrite replaces an earlier export only, never a
directory holding anything else.
Export then import gives back the same tensors bit for bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from modelzoo.config import ModelConfig, Params, load_params
from modelzoo.entry import OneLineParser, run_entry
from modelzoo.errors import CheckpointError, ConfigError, UserError
from modelzoo.files import check_output_dir
from modelzoo.models import build_model, hf
from modelzoo.training import checkpoint as ckpt

PROG = "python -m modelzoo.tools.convert_checkpoint"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      epilog="examples:\n  " + "\n  ".join(_examples()),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=["hf"], help="export a checkpoint to a transformers directory")
    way.add_argument("--from", dest="from_", choices=["hf", "genslm"],
                     help="import a transformers directory, or a GenSLM Lightning checkpoint, as checkpoint_0")
    p.add_argument("--model_dir", required=True, help="--to: read its newest checkpoint; --from: write checkpoint_0 "
                                                      "here (must hold no checkpoint yet)")
    p.add_argument("--checkpoint_path", help="--to: export this checkpoint instead of the newest in model_dir")
    p.add_argument("--output_dir", help="--to: the transformers directory to write (must not exist or be empty, "
                                        "or be an earlier export with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="--to: replace an earlier export in --output_dir")
    p.add_argument("--input_dir", help="--from: the transformers directory to read")
    p.add_argument("--params", help="--from hf: params yaml whose model section matches the transformers config")
    p.add_argument("--input_path", help="--from genslm: GenSLM's .pt checkpoint (read without running code from it)")
    p.add_argument("--config", help="--from genslm: its architecture file, e.g. GenSLM's neox_25,290,752.json")
    return p


def _examples() -> list[str]:
    return [f"{PROG} --to hf --model_dir model_dir/run1 --output_dir hf/run1",
            f"{PROG} --from hf --input_dir hf/run1 --params configs/genslm/gptj_25M_msl2048.yaml "
            "--model_dir model_dir/run2",
            f"{PROG} --from genslm --input_path patric_25m_epoch01.pt --config 'neox_25,290,752.json' "
            "--model_dir model_dir/genslm_25M"]


def export(model_dir: str, checkpoint_path: str | None, output_dir: str, overwrite: bool = False) -> str:
    path = Path(checkpoint_path) if checkpoint_path else ckpt.newest_good_checkpoint(model_dir)
    if path is None:
        raise CheckpointError(f"{model_dir}: no checkpoint to export (train first or pass --checkpoint_path)")
    out = Path(output_dir)
    inputs = [path, model_dir]
    check_output_dir(out, hf.EXPORT_TOOL, overwrite, inputs)  # before the checkpoint is read
    state = ckpt.load_checkpoint(path)
    if "params" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a model checkpoint (no params or model state)")
    raw = yaml.safe_load(state["params"])
    cfg = ModelConfig.model_validate(raw["model"])
    hf.save_hf(out, cfg, state["model"], label_names=_label_names(raw), overwrite=overwrite, inputs=inputs)
    return f"wrote {hf.architecture(cfg)} from {path} to {out}"


def _label_names(raw_params: dict) -> list[str] | None:
    """Class names of a classifier, read from its training labels file when it is still there."""
    from modelzoo.data.datasets import read_label_table
    section = raw_params.get("train_input") or {}
    if not raw_params["model"].get("num_labels") or not section.get("labels_file"):
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
    """A GenSLM Lightning checkpoint (read without running code from it) and its architecture
    file -> checkpoint_0 plus params_genslm.yaml (the model section) in model_dir."""
    from modelzoo.files import write_file_atomically
    from modelzoo.models import genslm

    _refuse_used(model_dir)
    params = genslm.params_of(genslm.read_architecture(config_path), str(config_path), model_dir)
    ours, unused = hf.from_hf_state(params.model, genslm.read_lightning_state(input_path), str(input_path))
    if unused:
        raise CheckpointError(f"{input_path}: tensor {unused[0]!r} is not part of the network in {config_path} "
                              f"({len(unused)} unused): checkpoint and architecture file differ")
    path = _write_imported(params, ours, input_path)
    write_file_atomically(Path(model_dir) / "params_genslm.yaml", params.to_yaml())
    n = sum(t.numel() for t in ours.values())
    return f"wrote {path} ({params.model.name}, {n:,} parameters) and params_genslm.yaml from {input_path}"


def _refuse_used(model_dir: str) -> None:
    if ckpt.list_checkpoints(model_dir):
        raise ConfigError(f"--model_dir {model_dir}: already holds checkpoints; import into an empty model_dir")


def _write_imported(params: Params, ours: dict, source) -> Path:
    """``ours`` (checked against the params' network) as checkpoint_0 of params' model_dir, the
    step training resumes or fine-tunes from."""
    from modelzoo.training.trainer import rng_state

    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_model(params.model).state_dict().items()}
    ckpt.check_model_state(source, ours, expected)
    torch.manual_seed(params.runconfig.seed)
    state = {"model": ours, "step": 0, "scheduler": {"step": 0}, "rng": rng_state(),
             "model_name": params.model.name, "params": params.to_yaml()}
    model_dir = Path(params.runconfig.model_dir)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--model_dir {model_dir}: cannot write ({e.strerror or e})") from None
    return ckpt.save_checkpoint(model_dir, 0, state)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    way = f"--to {args.to}" if args.to else f"--from {args.from_}"
    needed = {"--to hf": ["output_dir"], "--from hf": ["input_dir", "params"],
              "--from genslm": ["input_path", "config"]}[way]
    missing = [f"--{k}" for k in needed if getattr(args, k) is None]
    if missing:
        parser.error(f"{way} needs {' and '.join(missing)}")
    if args.to:
        return run_entry(lambda: export(args.model_dir, args.checkpoint_path, args.output_dir, args.overwrite))
    if args.from_ == "genslm":
        return run_entry(lambda: import_genslm(args.input_path, args.config, args.model_dir))
    return run_entry(lambda: import_(args.input_dir, args.params, args.model_dir))


if __name__ == "__main__":
    sys.exit(main())
