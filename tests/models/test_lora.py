"""LoRA fine-tuning (model.lora): adapters train and nothing else, on every backend alike.

- the adapted layer is the frozen weight plus (alpha / r) B A: forward equals the merged model's,
  and the adapters' gradients are full fine-tuning's gradient of that weight, restricted to the
  rank-r update (dL/dB = s G A^T, dL/dA = s B^T G);
- training on CPU and on CSX give the same steps, base weights stay bit for bit, only adapters
  have gradients and optimizer state (MemoryX too), and the CSX plan counts only theirs;
- a pretrained checkpoint without adapters starts a LoRA run (B zero: the pretrained model's
  logits at step 0), a LoRA run resumes exactly, --merge_lora writes a model_dir whose model
  scores as the LoRA one, and its transformers export equals the twin.
"""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from modelzoo.config import LoraConfig, ModelConfig
from modelzoo.errors import ConfigError
from modelzoo.models import MODELS, build_model
from modelzoo.models.lora import LoRALinear, is_adapter, merged_state, trainable_count
from modelzoo.training import checkpoint as ckpt
from tests.helpers import (RANKS_STEPS, assert_close_curves, assert_same_curve, assert_same_state, checkpoint, convert,
                           make_params, modelzoo_fixture, ranks_params, run_py, tensorboard_scalars, tiny_config,
                           tiny_params, train, train_cpu, write_params, write_shards)

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.1}


def tiny(name: str, **lora) -> ModelConfig:
    """The tiny model with adapters; a model that can classify does (BERT: its head is fresh too)."""
    key = MODELS[name].classifier_key
    extra = {key: 3} if key else {}
    return tiny_config(name, max_position_embeddings=16, lora=LoraConfig(**{**LORA, "dropout": 0.0, **lora}), **extra)


def with_trained_adapters(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """The LoRA model in float64 with every adapter non-zero (as after some training)."""
    torch.manual_seed(seed)
    model = build_model(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.normal_(0.0, 0.2)
    return model


def plain_of(cfg: ModelConfig, state: dict) -> torch.nn.Module:
    model = build_model(cfg.model_copy(update={"lora": None})).double().eval()
    model.load_state_dict(merged_state(state, cfg.lora))
    return model


def batch_of(cfg: ModelConfig, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 69, (2, 16), generator=generator)
    labels = torch.tensor([0, 2]) if cfg.num_labels else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_equals_the_merged_model(name):
    cfg = tiny(name)
    model = with_trained_adapters(cfg)
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 4 * cfg.num_hidden_layers  # the default targets: every block's four projections
    for layer in adapted:  # the layer's effective weight, read off its action on the unit vectors
        eye = torch.eye(layer.in_features, dtype=torch.float64)
        effective = (layer(eye) - layer(torch.zeros_like(eye))).t()
        merged = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
        torch.testing.assert_close(effective, merged, rtol=0, atol=1e-12)
    batch = batch_of(cfg)
    ours, plain = model(batch), plain_of(cfg, model.state_dict())(batch)
    torch.testing.assert_close(ours["logits"], plain["logits"], rtol=0, atol=1e-10)
    # in float32 too, to the 1e-6 the merge promises
    single = build_model(cfg).eval()
    single.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    merged = build_model(cfg.model_copy(update={"lora": None})).eval()
    merged.load_state_dict(merged_state(single.state_dict(), cfg.lora))
    torch.testing.assert_close(single(batch)["logits"], merged(batch)["logits"], rtol=0, atol=1e-6)


def test_adapter_gradients_are_full_fine_tuning_restricted_to_the_update():
    cfg = tiny("gpt2")
    model = with_trained_adapters(cfg)
    plain = plain_of(cfg, model.state_dict())
    batch = batch_of(cfg)
    model(batch)["loss"].backward()
    plain(batch)["loss"].backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(not is_adapter(n) for n in frozen)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    plain_params = dict(plain.named_parameters())
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            g = plain_params[f"{name}.weight"].grad  # full fine-tuning's gradient of the merged weight
            s, a, b = layer.scaling, layer.lora_A, layer.lora_B
            torch.testing.assert_close(b.grad, s * g @ a.t(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(a.grad, s * b.t() @ g, rtol=1e-10, atol=1e-12)


def test_fresh_adapters_start_from_the_frozen_model():
    cfg = tiny("gptj", targets=["attn.qkv", "head.lm_head"], trainable=["head.ln_f.*"])
    torch.manual_seed(0)
    model = build_model(cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == [n for n in names if is_adapter(n) or n.startswith("head.ln_f.")]
    assert {"head.lm_head.lora_A", "head.ln_f.weight", "head.ln_f.bias", "blocks.1.attn.qkv.lora_B"} <= set(names)
    assert all(not p.any() for n, p in model.named_parameters() if n.endswith("lora_B"))
    assert all(p.std() > 0 for n, p in model.named_parameters() if n.endswith("lora_A"))
    trained, total = trainable_count(model)
    assert trained == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) < total
    plain = build_model(cfg.model_copy(update={"lora": None}))
    plain.load_state_dict(merged_state(model.state_dict(), cfg.lora))
    batch = batch_of(cfg)
    assert torch.equal(model.eval()(batch)["logits"], plain.eval()(batch)["logits"])  # B = 0: exactly


def test_a_classifier_adapts_from_an_mlm_checkpoint_with_its_new_head_trained():
    """Fine-tuning's transfer takes the backbone from the checkpoint and keeps the model's own
    fresh head and adapters; lora.trainable makes the new head train beside the adapters."""
    from modelzoo.models import transfer_backbone
    saved = build_model(tiny_config("bert", max_position_embeddings=16)).state_dict()
    model = build_model(tiny_config("bert", max_position_embeddings=16, num_labels=3,
                                    lora=LoraConfig(trainable=["head.*"])))
    fresh = model.state_dict()
    state = transfer_backbone(saved, fresh, "mlm.mdl")
    assert state.keys() == fresh.keys()
    for name, value in state.items():
        assert value is (fresh[name] if is_adapter(name) or name not in saved else saved[name]), name
    trained = {n for n, p in model.named_parameters() if p.requires_grad and not is_adapter(n)}
    assert trained == {"head.pooler.weight", "head.pooler.bias", "head.classifier.weight", "head.classifier.bias"}


@pytest.mark.parametrize("lora_params,expected", [
    ("{r: 4, alpha: 8, dropout: 0.1, target_modules: [MultiheadAttention], merge_weights: true}",
     {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["attn.qkv", "attn.out"]}),
    ("[{r: 16, target_modules: [TransformerDecoderLayer, Linear]}]",
     {"rank": 16, "alpha": 1.0, "dropout": 0.0, "targets": ["attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out"]}),
    ("{r: 2}", {"rank": 2, "alpha": 1.0, "dropout": 0.0, "targets": ["*"]}),
    ("{r: 2, fan_in_fan_out: true}", "fan_in_fan_out: true is for transposed (Conv1D) weights"),
    ("{r: 0}", "adapters need a rank of at least 1"),
    ("{r: 2, target_modules: [Embedding]}", "give module classes among MultiheadAttention"),
    ("[{r: 2}, {r: 4}]", "2 groups: model.lora trains one kind of adapter"),
])
def test_modelzoo_lora_params_map_to_model_lora(lora_params, expected, shards_msl64, tmp_path):
    from modelzoo.config import load_params
    path = modelzoo_fixture("gpt2_sectioned.yaml", tmp_path, shards_msl64,
                            edit=lambda text: text.replace("model:\n", f"model:\n    lora_params: {lora_params}\n", 1))
    if isinstance(expected, dict):
        params = load_params(path)
        assert params.model.lora.model_dump(exclude={"trainable"}) == expected
        build_model(params.model)  # the targets select layers of the model
    else:
        with pytest.raises(ConfigError, match="model.lora_params: .*" + re.escape(expected)):
            load_params(path)


def test_bad_targets_and_lora_with_sparsity_are_one_line(data_dir):
    with pytest.raises(ConfigError, match=r"model.lora.targets: 'attn.q' selects no Linear layer of this model; "
                                          r"its Linear layers are attn.out, attn.qkv, head.lm_head, mlp.fc_in"):
        build_model(tiny("gpt_neox", targets=["attn.qkv", "attn.q"]))
    with pytest.raises(ConfigError, match=r"model.lora.trainable: 'head.classifier.\*' matches no parameter of "
                                          r"this model \(its parameters are named like embeddings.tokens.weight, "):
        build_model(tiny("gpt2", trainable=["head.classifier.*"]))
    raw = yaml.safe_load(make_params(data_dir).to_yaml())
    raw["model"]["lora"] = LORA
    raw["sparsity"] = {"density": 0.5}
    from modelzoo.config import validate_params
    with pytest.raises(ConfigError, match="model.lora: LoRA freezes the weights that sparsity would prune"):
        validate_params(raw)


def lora_params(data_dir, **kw):
    params = make_params(data_dir, **kw)
    return params.model_copy(update={"model": params.model.model_copy(update={"lora": LoraConfig(**LORA)})})


@pytest.mark.parametrize("keep", [False, True])
def test_csx_trains_as_cpu_adapters_only(data_dir, keep):
    """Dropout (the adapters' too), clipping, two micro-batches: CPU and CSX take the same steps;
    the frozen weights come back bit for bit, only adapters have optimizer state, MemoryX too."""
    params = lora_params(data_dir, csx={"keep_activations": keep})
    torch.manual_seed(params.runconfig.seed)
    start = build_model(params.model).state_dict()
    cpu, cpu_backend = train("cpu", params, steps=4)
    csx, csx_backend = train("csx", params, steps=4)
    assert cpu[0][0] != cpu[-1][0]
    assert_close_curves(cpu, csx)
    for backend in (cpu_backend, csx_backend):
        state = backend.state_dict()
        for name, value in state["model"].items():
            if is_adapter(name):
                assert not torch.equal(value, start[name]) or name.endswith("lora_A"), name
            else:
                assert torch.equal(value, start[name]), f"{name} changed"
        assert set(state["optimizer"]["state"]) == {n for n in start if is_adapter(n)}
    handles = csx_backend.memoryx.handles
    assert {n for n, h in handles.items() if h.requires_grad} == {n for n in start if is_adapter(n)}
    csx_backend.close()


@pytest.mark.distributed
def test_two_fsdp_ranks_and_two_csx_systems_follow_one_rank(tmp_path, monkeypatch, capsys):
    """run.py end to end: FSDP shards frozen and trained weights alike (only the adapters'
    gradients are reduced), CSX builds the model deferred and splits MemoryX over two systems;
    the same losses, weights and adapter-only optimizer state as one CPU rank."""
    write_shards(tmp_path / "data" / "train", 48, seed=0)
    write_shards(tmp_path / "data" / "val", 16, seed=1)
    lora = {"model": {"lora": {"rank": 4, "alpha": 8.0}}}  # no dropout: each rank draws its own masks
    ranks_params(tmp_path / "one.yaml", mode="train", clip=1.0, extra=lora)
    ranks_params(tmp_path / "fsdp.yaml", mode="train", clip=1.0, sharding="fsdp", extra=lora)
    monkeypatch.chdir(tmp_path)
    train_cpu(capsys, "one.yaml", "--model_dir", "one")
    run_py(tmp_path, "CPU", "--params", "fsdp.yaml", "--model_dir", "fsdp", "--num_workers_per_node", "2")
    run_py(tmp_path, "CSX", "--params", "one.yaml", "--model_dir", "csx", "--num_csx", "2")
    one = checkpoint(tmp_path / "one")
    assert set(one["optimizer"]["state"]) == {n for n in one["model"] if is_adapter(n)}
    for run_dir in ("fsdp", "csx"):
        assert_same_curve(tensorboard_scalars(tmp_path / run_dir / "train", "loss"),
                          tensorboard_scalars(tmp_path / "one" / "train", "loss"),
                          range(1, RANKS_STEPS + 1))
        assert_same_state(checkpoint(tmp_path / run_dir), one)


def test_csx_plan_counts_only_adapters_gradients_and_state(data_dir):
    from modelzoo.backends.csx.plan import make_plan
    params = lora_params(data_dir)
    plans = {}
    for lora in (None, params.model.lora):
        with torch.device("meta"):
            model = build_model(params.model.model_copy(update={"lora": lora}))
        plans[lora is None] = make_plan(model, (2, 32), 2, 1, 1, params.optimizer, keep_activations=False)
    trained, total = trainable_count(model)
    full, adapted = plans[True], plans[False]
    adapters = total - full.memoryx_bytes // 16  # Adam: weights, gradients and 2 states per weight, 4 bytes
    assert adapters == trained and adapted.frozen == total - trained
    assert adapted.memoryx_bytes == 4 * total + 4 * 3 * trained
    assert adapted.streamed_out == 2 * 4 * trained  # two micro-batches of adapter gradients, nothing else
    assert adapted.streamed_in > full.streamed_in  # the frozen weights still stream in


def test_fine_tune_from_pretrained_resume_merge_and_export(shards_msl64, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from modelzoo.inference import GenomeLM
    from modelzoo.models import hf
    raw = tiny_params(shards_msl64, tmp_path / "pretrained", max_steps=2, checkpoint_steps=0)
    train_cpu(capsys, write_params(tmp_path / "pre.yaml", raw))
    pretrained = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "pretrained", 2))["model"]

    raw["model"]["lora"] = {**LORA, "targets": ["attn.qkv", "mlp.fc_out"]}
    raw["runconfig"].update(model_dir=str(tmp_path / "lora"), max_steps=4, checkpoint_steps=2)
    lora_yaml = write_params(tmp_path / "lora.yaml", raw)
    out = train_cpu(capsys, lora_yaml, "--checkpoint_path", ckpt.checkpoint_path(tmp_path / "pretrained", 2),
                    "--load_checkpoint_states", "model")
    # per block: qkv A 4x32 + B 96x4, fc_out A 4x128 + B 32x4 = 1,152; two blocks
    assert "fresh LoRA adapters on 4 layers" in out and "training 2,304 of 32,032 parameters (the rest frozen)" in out
    tuned = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "lora", 4))
    for name, value in tuned["model"].items():
        if not is_adapter(name):
            assert torch.equal(value, pretrained[name]), f"{name} changed"
    assert set(tuned["optimizer"]["state"]) == {n for n in tuned["model"] if is_adapter(n)}

    # resume from step 2 equals the straight run
    raw["runconfig"]["model_dir"] = str(tmp_path / "resumed")
    (tmp_path / "resumed").mkdir()
    ckpt.save_checkpoint(tmp_path / "resumed", 2, ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "lora", 2)))
    train_cpu(capsys, write_params(tmp_path / "resumed.yaml", raw))
    resumed = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "resumed", 4))["model"]
    assert all(torch.equal(resumed[k], v) for k, v in tuned["model"].items())

    code, out = convert(capsys, "--merge_lora", "--model_dir", tmp_path / "lora", "--output_dir", tmp_path / "merged")
    assert code == 0, out
    assert "the adapters of 4 layers folded into their weights" in out
    merged_ckpt = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "merged", 4))
    assert "lora" not in yaml.safe_load(merged_ckpt["params"])["model"] and "optimizer" not in merged_ckpt
    assert not any(is_adapter(k) for k in merged_ckpt["model"])
    ids = torch.randint(5, 69, (2, 64), generator=torch.Generator().manual_seed(0))
    logits = {}
    for which in ("lora", "merged"):
        model = GenomeLM.load(tmp_path / which).model.eval()
        logits[which] = model({"input_ids": ids})["logits"]
    torch.testing.assert_close(logits["merged"], logits["lora"], rtol=0, atol=1e-5)

    # the merged model's transformers export equals the twin; --to hf of the LoRA dir merges alike
    for source, out_dir in (("merged", "hf"), ("lora", "hf_direct")):
        code, out = convert(capsys, "--to", "hf", "--model_dir", tmp_path / source, "--output_dir", tmp_path / out_dir)
        assert code == 0, out
    twin = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = twin(input_ids=ids).logits
    torch.testing.assert_close(theirs, logits["merged"].detach(), rtol=0, atol=1e-4)
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf_direct" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert hf.architecture(ModelConfig(**yaml.safe_load(merged_ckpt["params"])["model"])) == "GPT2LMHeadModel"

    # the merged model_dir trains on, every weight now: its params name it
    train_cpu(capsys, tmp_path / "merged" / "params_merged.yaml", "--max_steps", 5)
    assert ckpt.checkpoint_path(tmp_path / "merged", 5).is_file()


def test_merge_refusals_are_one_line_and_write_nothing(shards_msl64, tmp_path, capsys):
    raw = tiny_params(shards_msl64, tmp_path / "plain", max_steps=1, checkpoint_steps=0)
    train_cpu(capsys, write_params(tmp_path / "plain.yaml", raw))
    code, out = convert(capsys, "--merge_lora", "--model_dir", tmp_path / "plain", "--output_dir", tmp_path / "out")
    assert code == 2 and "its params have no model.lora: there are no adapters to merge" in out
    assert len(out.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    code, out = convert(capsys, "--merge_lora", "--model_dir", tmp_path / "plain", "--output_dir", tmp_path / "taken",
                        "--overwrite")
    assert code == 2 and "not written by modelzoo.tools.convert_checkpoint --merge_lora" in out
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as exited:
        convert(capsys, "--merge_lora", "--model_dir", tmp_path / "plain")
    assert exited.value.code == 2 and "--merge_lora needs --output_dir" in capsys.readouterr().err
