"""GenSLM's released checkpoints (PyTorch Lightning pickles of a transformers GPTNeoXForCausalLM)
import without running any code from the file, and the imported model is the same network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelzoo.errors import CheckpointError
from modelzoo.inference import GenomeLM
from modelzoo.models import genslm

transformers = pytest.importorskip("transformers")

# GenSLM's architecture file format (transformers 4.21 keys), at a test's size
ARCH = {"architectures": ["GPTNeoXForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "intermediate_size": 128, "attention_probs_dropout_prob": 0.1,
        "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu_fast", "hidden_dropout_prob": 0.1,
        "initializer_range": 0.02, "layer_norm_eps": 1e-05, "max_position_embeddings": 64,
        "model_type": "gpt_neox", "rotary_emb_base": 10000, "rotary_pct": 0.25,
        "tie_word_embeddings": False, "use_cache": True, "vocab_size": 69}


class Payload:
    """What a hostile checkpoint carries: unpickling it would create the file named."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def twin_model() -> "transformers.GPTNeoXForCausalLM":
    keys = {k: v for k, v in ARCH.items() if k not in ("architectures", "hidden_dropout_prob",
                                                         "attention_probs_dropout_prob")}
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**keys)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def lightning_checkpoint(path: Path, model, sentinel: Path) -> Path:
    """A file shaped like GenSLM's: Lightning's keys, the model under ``model.``, the fixed-length
    attention buffers of transformers 4.21, and objects of classes this process need not have."""
    # transformers 4.x names, as GenSLM's files (5.x calls the LM head lm_head in memory)
    state = {f"model.{k.replace('lm_head.', 'embed_out.')}": v for k, v in model.state_dict().items()}
    for i in range(ARCH["num_hidden_layers"]):
        layer = f"model.gpt_neox.layers.{i}.attention."
        state[layer + "bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
        state[layer + "masked_bias"] = torch.tensor(-1e9)
        state[layer + "rotary_emb.inv_freq"] = torch.ones(4)
    torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.6.5", "state_dict": state,
                "hyper_parameters": {"cfg": Payload(sentinel)}, "callbacks": {"ModelCheckpoint": Payload(sentinel)},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 5e-5}]}]}, path)
    return path


@pytest.fixture
def released(tmp_path):
    model = twin_model()
    sentinel = tmp_path / "payload_ran"
    ckpt = lightning_checkpoint(tmp_path / "genslm.pt", model, sentinel)
    arch = tmp_path / "neox_arch.json"
    arch.write_text(json.dumps(ARCH, indent=4).replace("false", "False"))  # as GenSLM's 25B file: not JSON
    return model, ckpt, arch, sentinel


def test_import_runs_no_code_and_gives_the_same_network(released, tmp_path):
    model, ckpt, arch, sentinel = released
    from modelzoo.tools.convert_checkpoint import main
    md = tmp_path / "md"
    assert main(["--from", "genslm", "--input_path", str(ckpt), "--config", str(arch), "--model_dir", str(md)]) == 0
    assert not sentinel.exists()
    assert (md / "checkpoint_0.mdl").is_file() and (md / "params_genslm.yaml").is_file()
    lm = GenomeLM.load(md)
    assert lm.config.name == "gpt_neox" and lm.config.dropout_rate == 0.1
    ids = torch.randint(5, 69, (2, 40))
    with torch.no_grad():
        ours = lm.model({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["logits"]
        theirs = model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert len(lm.generate("ATG", max_codons=5, temperature=0)) > 0
    assert not sentinel.exists()


def test_plain_torch_load_would_have_run_the_payload(released):
    """The fixture is a real attack: only the inert reader keeps it from running."""
    _, ckpt, _, sentinel = released
    torch.load(ckpt, weights_only=False)
    assert sentinel.exists()


def test_import_then_fine_tune_at_a_longer_length(released, tmp_path, shards_msl64):
    """GenSLM's 2,048 -> 10,240 step, here 64 -> 128 positions: rotary weights do not depend on it."""
    import yaml
    from modelzoo.cli import main as run_main
    from tests.conftest import tiny_params, write_params

    _, ckpt, arch, _ = released
    md = tmp_path / "md"
    from modelzoo.tools.convert_checkpoint import import_genslm
    assert import_genslm(str(ckpt), str(arch), str(md)).startswith("wrote")
    imported = yaml.safe_load((md / "params_genslm.yaml").read_text())["model"]
    params = tiny_params(shards_msl64, md)
    params["model"] = dict(imported, max_position_embeddings=128)
    assert run_main(["CPU", "--params", str(write_params(tmp_path / "p.yaml", params)), "--max_steps", "2",
                     "--mode", "train"]) == 0
    assert (md / "checkpoint_2.mdl").is_file()


def test_not_a_genslm_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, bad)
    with pytest.raises(CheckpointError, match="not a GenSLM GPT-NeoX checkpoint"):
        genslm.read_lightning_state(bad)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        genslm.read_lightning_state(tmp_path / "junk.pt")
