"""GenSLM's checkpoints (pickles of a transformers GPTNeoXForCausalLM in every layout GenSLM users
have) import without running any code from the file, the imported model is the same network, and
``--to genslm`` writes what GenSLM's own loader reads back to the same logits. Hostile files (BUILD
on a real function, GLOBALs of lazy modules, zip bombs) are built here and refused in one line."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from modelzoo.errors import CheckpointError
from modelzoo.inference import GenomeLM
from modelzoo.models import genslm
from tests.helpers import REPO

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
    assert lm.config.name == "gpt_neox" and lm.config.dropout_rate == 0.0  # GenSLM's fork has no dropout
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
    from tests.helpers import tiny_params, write_params

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
    with pytest.raises(CheckpointError, match="no tensor 'gpt_neox.embed_in.weight' under any layout.*"
                                              "'_forward_module.model.gpt_neox...'.*a DeepSpeed model-states file"):
        genslm.read_checkpoint(bad)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        genslm.read_checkpoint(tmp_path / "junk.pt")


# ---------------------------------------------------------------- every layout, and back to GenSLM

def _hf4_names(model) -> dict:
    """The twin's tensors under transformers 4.x's names (GenSLM's files)."""
    return {k.replace("lm_head.", "embed_out."): v for k, v in model.state_dict().items()}


def _layouts(model) -> dict:
    """The files GenSLM users hold, each built from the twin as the tool that writes it lays it out."""
    hf4 = _hf4_names(model)
    return {
        # GenSLM's released inference weights: what its GenSLM class loads (bias removed, as released)
        "unprefixed": {"state_dict": dict(hf4), "global_step": 10},
        # DeepSpeed's zero_to_fp32 of a Lightning run: a bare dict under Lightning's wrapper module
        "deepspeed_lightning2": {f"_forward_module.model.{k}": v for k, v in hf4.items()},
        "deepspeed_lightning1": {f"module.model.{k}": v for k, v in hf4.items()},
        "deepspeed_bare": {f"module.{k}": v for k, v in hf4.items()},
        # torch.save(model.state_dict()) from transformers 5.x: lm_head, not embed_out
        "transformers5_state_dict": dict(model.state_dict()),
        "lightning_lm_head": {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
        # DeepSpeed's own model-states file (mp_rank_00_model_states.pt) of a bare model
        "deepspeed_model_states": {"module": {f"module.{k}": v for k, v in hf4.items()}, "buffer_names": []},
    }


def _logits_of_twin(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _logits_of(lm, ids):
    with torch.no_grad():
        return lm.model({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["logits"]


@pytest.mark.parametrize("layout", ["unprefixed", "deepspeed_lightning2", "deepspeed_lightning1", "deepspeed_bare",
                                    "transformers5_state_dict", "lightning_lm_head", "deepspeed_model_states"])
def test_every_layout_imports_to_the_same_logits(layout, released, tmp_path):
    from modelzoo.tools.convert_checkpoint import main
    model, _, arch, _ = released
    path = tmp_path / f"{layout}.pt"
    torch.save(_layouts(model)[layout], path)
    md = tmp_path / "md"
    assert main(["--from", "genslm", "--input_path", str(path), "--config", str(arch), "--model_dir", str(md)]) == 0
    ids = torch.randint(5, 69, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits_of(GenomeLM.load(md), ids), _logits_of_twin(model, ids), rtol=0, atol=1e-5)
    # and out again, to what GenSLM's loader reads
    out, out_arch = tmp_path / "back.pt", tmp_path / "back.json"
    assert main(["--to", "genslm", "--model_dir", str(md), "--output_path", str(out), "--config", str(out_arch)]) == 0
    twin, _, result = _genslm_loader(out, out_arch)
    assert result.missing_keys == []
    torch.testing.assert_close(_logits_of_twin(twin, ids), _logits_of_twin(model, ids), rtol=0, atol=1e-5)


def test_a_missing_tensor_is_named_as_the_file_spells_it(released, tmp_path):
    model, _, arch, _ = released
    state = {f"module.model.{k}": v for k, v in _hf4_names(model).items()
             if k != "gpt_neox.layers.1.mlp.dense_4h_to_h.bias"}
    torch.save(state, tmp_path / "partial.pt")
    from modelzoo.tools.convert_checkpoint import import_genslm
    with pytest.raises(CheckpointError, match=r"no tensor 'module\.model\.gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.bias'"
                                              r" in this Lightning < 1\.8 DeepSpeed in a bare state dict"):
        import_genslm(str(tmp_path / "partial.pt"), str(arch), str(tmp_path / "md"))
    assert not (tmp_path / "md" / "checkpoint_0.mdl").exists()


def _genslm_loader(weights: Path, config: Path):
    """GenSLM's own loader (genslm/inference.py GenSLM.configure_model): a GPTNeoXForCausalLM from
    the architecture file, then load_state_dict(torch.load(...)["state_dict"], strict=False). Here
    under transformers 5.x, whose LM head is named lm_head: the one rename 4.x does not need."""
    arch = json.loads(config.read_text())
    keys = {k: v for k, v in arch.items() if k != "architectures"}
    twin = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**keys)).eval()
    state = torch.load(weights, map_location="cpu", weights_only=True)["state_dict"]
    result = twin.load_state_dict({k.replace("embed_out.", "lm_head."): v for k, v in state.items()}, strict=False)
    return twin, state, result


def test_export_to_genslm_reads_back_in_genslm_and_here(released, tmp_path):
    from modelzoo.tools.convert_checkpoint import main
    model, ckpt, arch, _ = released
    md = tmp_path / "md"
    assert main(["--from", "genslm", "--input_path", str(ckpt), "--config", str(arch), "--model_dir", str(md)]) == 0
    out, out_arch = tmp_path / "export" / "genslm.pt", tmp_path / "export" / "arch.json"
    out.parent.mkdir()
    argv = ["--to", "genslm", "--model_dir", str(md), "--output_path", str(out), "--config", str(out_arch)]
    assert main(argv) == 0

    twin, state, result = _genslm_loader(out, out_arch)
    assert result.missing_keys == []  # every weight GenSLM's model has came from the file
    buffers = {k for k in state if k.endswith((".attention.masked_bias", ".rotary_emb.inv_freq"))}
    assert set(result.unexpected_keys) == buffers and len(buffers) == 2 * ARCH["num_hidden_layers"]
    rotary = int(ARCH["hidden_size"] // ARCH["num_attention_heads"] * ARCH["rotary_pct"])
    expected_inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))  # transformers 4.21's
    torch.testing.assert_close(state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"], expected_inv_freq)
    assert float(state["gpt_neox.layers.1.attention.masked_bias"]) == -1e9
    assert all(not k.startswith("model.") for k in state)  # GenSLM's loader needs them unprefixed
    ids = torch.randint(5, 69, (2, 40), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits_of_twin(twin, ids), _logits_of_twin(model, ids), rtol=0, atol=1e-5)

    # and back: the export imports here again, bit for bit
    again = tmp_path / "again"
    assert main(["--from", "genslm", "--input_path", str(out), "--config", str(out_arch), "--model_dir", str(again)]) == 0
    first = ckpt_state(md / "checkpoint_0.mdl")
    for key, value in ckpt_state(again / "checkpoint_0.mdl").items():
        assert torch.equal(value, first[key]), key

    # the tool's own output is replaced only with --overwrite; a file it did not write never
    assert main(argv) == 2
    assert main(argv + ["--overwrite"]) == 0
    user_file = tmp_path / "export" / "notes.pt"
    user_file.write_text("mine")
    assert main(["--to", "genslm", "--model_dir", str(md), "--output_path", str(user_file), "--overwrite"]) == 2
    assert user_file.read_text() == "mine"
    newest = md / "checkpoint_0.mdl"
    before = newest.read_bytes()
    assert main(["--to", "genslm", "--model_dir", str(md), "--output_path", str(newest), "--overwrite"]) == 2
    assert newest.read_bytes() == before


def ckpt_state(path):
    from modelzoo.training import checkpoint
    return checkpoint.load_checkpoint(path)["model"]


def test_to_genslm_refuses_another_architecture(tmp_path, capsys):
    """Only GPT-NeoX is a GenSLM model: one line, nothing written."""
    from modelzoo.config import ModelConfig
    from modelzoo.tools.convert_checkpoint import _write_imported, main
    from modelzoo.config import validate_params
    from modelzoo.models import build_model
    params = validate_params({"model": {"name": "gpt2", "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 4,
                                        "max_position_embeddings": 16},
                              "runconfig": {"model_dir": str(tmp_path / "md")}}, check_paths=False)
    _write_imported(params, build_model(ModelConfig.model_validate(params.model.model_dump())).state_dict(), "test")
    assert main(["--to", "genslm", "--model_dir", str(tmp_path / "md"), "--output_path", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a gpt_neox checkpoint" in err[0]
    assert not (tmp_path / "x.pt").exists()


def test_genslm_25b_architecture_file_says_what_it_means(tmp_path):
    """GenSLM's neox_25,076,188,032.json: hidden 8196 over 64 heads (and Python's True)."""
    peer = REPO.parent / "shared" / "data" / "peer" / "genslm" / "architectures" / "neox"
    path = peer / "neox_25,076,188,032.json"
    if not path.is_file():
        path = tmp_path / "neox_25B.json"
        path.write_text(json.dumps(dict(ARCH, hidden_size=8196, num_attention_heads=64, num_hidden_layers=64,
                                        intermediate_size=8000), indent=4).replace("false", "False"))
    with pytest.raises(CheckpointError) as caught:
        genslm.read_architecture(path)
    message = str(caught.value)
    assert "\n" not in message
    assert "hidden_size 8196 is not a multiple of its 64 heads" in message
    assert "nearest valid one is hidden_size 8192 (64 heads of 128" in message


def test_a_checkpoint_of_another_width_is_one_line(released, tmp_path):
    _, ckpt, _, _ = released
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps(dict(ARCH, hidden_size=128)))
    from modelzoo.tools.convert_checkpoint import import_genslm
    with pytest.raises(CheckpointError, match="gpt_neox.embed_in.weight is 64 wide but .*wide.json says hidden_size 128"):
        import_genslm(str(ckpt), str(wide), str(tmp_path / "md"))


# ---------------------------------------------------------------- hostile files

def _torch_zip_with_pickle(path: Path, data_pkl: bytes, compress: bool = False) -> Path:
    """A torch.save archive whose data.pkl is replaced by ``data_pkl`` (deflated if ``compress``)."""
    benign = path.with_suffix(".benign")
    torch.save({"x": 1}, benign)
    with zipfile.ZipFile(benign) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("/data.pkl"):
                method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
                dst.writestr(info.filename, data_pkl, compress_type=method, compresslevel=9 if compress else None)
            else:
                dst.writestr(info, src.read(info))
    benign.unlink()
    return path


def _binunicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


# (None, {'__defaults__': (-1,)}) applied by BUILD to torch._utils._rebuild_tensor_v2 itself
BUILD_ON_REAL_FUNCTION = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}" + _binunicode("__defaults__")
                          + b"(J\xff\xff\xff\xfft" + b"s\x86b.")


def test_build_on_a_real_function_is_refused_and_changes_nothing(tmp_path):
    original = torch._utils._rebuild_tensor_v2.__defaults__
    # the attack is real: Python's own unpickler sets the function's defaults
    pickle.loads(BUILD_ON_REAL_FUNCTION)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == (-1,)
    torch._utils._rebuild_tensor_v2.__defaults__ = original

    path = _torch_zip_with_pickle(tmp_path / "build.pt", BUILD_ON_REAL_FUNCTION)
    with pytest.raises(CheckpointError, match="BUILD on _rebuild_tensor_v2 refused"):
        genslm.read_pickled(path)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == original


def test_a_global_of_a_lazy_torch_module_imports_nothing(tmp_path):
    """``GLOBAL torch _inductor`` is a stand-in: nothing is looked up on torch, so nothing is imported."""
    path = _torch_zip_with_pickle(tmp_path / "lazy.pt", b"\x80\x02ctorch\n_inductor\n}\x86.")
    warm = tmp_path / "warm.pt"
    torch.save({"x": torch.zeros(2)}, warm)  # what torch.load itself imports on first use comes first
    probe = ("import sys; from modelzoo.models import genslm; "
             f"genslm.read_pickled({str(warm)!r}); before = set(sys.modules); "
             f"genslm.read_pickled({str(path)!r}); "
             "print(sorted(m for m in set(sys.modules) - before if m.startswith('torch')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _zip_bomb(path: Path, size: int = 32 << 20) -> Path:
    """A torch.save archive whose data.pkl is a valid pickle of ``size`` zero bytes, deflated ~1000x."""
    pkl = b"\x80\x04\x8e" + struct.pack("<Q", size) + bytes(size) + b"."
    return _torch_zip_with_pickle(path, pkl, compress=True)


def test_a_zip_bomb_is_refused_by_every_loader(tmp_path):
    bomb = _zip_bomb(tmp_path / "bomb.pt")
    assert bomb.stat().st_size < 200_000
    with pytest.raises(CheckpointError, match=r"would expand to 33,554,4\d\d bytes from a .*refused as a zip bomb"):
        genslm.read_checkpoint(bomb)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    _zip_bomb(hf_dir / "pytorch_model.bin")
    from modelzoo.models import hf
    with pytest.raises(CheckpointError, match="pytorch_model.bin: its zip entries would expand"):
        hf.read_hf(hf_dir)
    # our own checkpoints: a seal says the bytes are intact, not who wrote them
    import hashlib
    from modelzoo.training import checkpoint
    (tmp_path / "md").mkdir()
    sealed = _zip_bomb(tmp_path / "md" / "checkpoint_1.mdl")
    sealed.with_name(sealed.name + ".sha256").write_text(hashlib.sha256(sealed.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match="checkpoint_1.mdl: its zip entries would expand"):
        checkpoint.load_checkpoint(sealed)
