"""Loading a checkpoint never runs code: a checkpoint holds tensors and plain data only, and every
loader (training resume, --checkpoint_path, eval, eval_all, GenomeLM.load, convert_checkpoint)
refuses anything else in one line, even when the file carries a matching seal (the seal detects
corruption, not who wrote the file)."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from modelzoo import GenomeLM
from modelzoo.cli import main as cli_main
from modelzoo.errors import CheckpointError
from modelzoo.tools import convert_checkpoint
from modelzoo.training import checkpoint as ckpt
from modelzoo.training.checkpoint import rng_state, set_rng_state
from tests.helpers import one_line_error, steady_params, write_params

PLAIN = (bool, int, float, str, type(None), torch.Tensor, torch.Size)


class Payload:
    """Unpickling this runs ``call(*args)``, as a hostile checkpoint would."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def payloads(sentinel: Path) -> dict[str, Payload]:
    return {"os.system": Payload(os.system, f"touch {sentinel}"),
            "Path.touch": Payload(Path.touch, sentinel),  # pickled as getattr(Path, 'touch')
            "exec": Payload(exec, f"open({str(sentinel)!r}, 'w').close()")}


def seal(path: Path) -> Path:
    """A matching .sha256, as anyone can write next to any file."""
    ckpt._seal_path(path).write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def plant(path: Path, state: dict, payload: Payload) -> Path:
    """A real checkpoint with a payload among its states, sealed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "rng": {**state["rng"], "extra": payload}}, path)
    return seal(path)


@pytest.fixture
def trained(tmp_path, shards):  # noqa: F811
    """(params yaml, model_dir) of a two-step CPU run with checkpoint_2. Per test: conftest puts
    back the logger that a run in this process configures only around a test's own fixtures."""
    root = tmp_path / "trained"
    root.mkdir()
    params = write_params(root / "params.yaml", steady_params(shards, root / "model_dir", max_steps=2))
    assert cli_main(["CPU", "--params", str(params)]) == 0
    return params, root / "model_dir"


@pytest.fixture
def bad(tmp_path, trained):
    """(sentinel, model_dir whose only and newest checkpoint carries a sealed payload)."""
    sentinel = tmp_path / "PAYLOAD_RAN"
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(trained[1], 2))
    model_dir = tmp_path / "bad_dir"
    plant(ckpt.checkpoint_path(model_dir, 2), state, payloads(sentinel)["os.system"])
    return sentinel, model_dir


def assert_refused(message: str, path: Path) -> None:
    assert str(path) in message and "\n" not in message and "Traceback" not in message, message
    assert "holds objects other than tensors and plain data" in message and "not loaded" in message, message


# ------------------------------------------------------------------ every loader refuses, nothing runs

@pytest.mark.parametrize("kind", ["os.system", "Path.touch", "exec"])
def test_load_checkpoint_refuses_a_sealed_payload_without_running_it(tmp_path, trained, kind):
    sentinel = tmp_path / "PAYLOAD_RAN"
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(trained[1], 2))
    path = plant(tmp_path / "checkpoint_2.mdl", state, payloads(sentinel)[kind])
    assert ckpt.verify(path) is None  # the seal matches: it says nothing about who wrote the file
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path)
    assert_refused(str(info.value), path)
    assert not sentinel.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert sentinel.exists()


def test_checkpoint_path_refused_in_train_and_eval(tmp_path, trained, bad, capsys):
    sentinel, model_dir = bad
    path = ckpt.checkpoint_path(model_dir, 2)
    fresh = tmp_path / "fresh"
    for mode in ("train", "eval"):
        line = one_line_error(capsys, "CPU", "--params", trained[0], "--mode", mode, "--model_dir", fresh,
                              "--checkpoint_path", path)
        assert_refused(line, path)
    assert not sentinel.exists() and not fresh.exists()


@pytest.mark.parametrize("mode", ["train", "eval", "eval_all"])
def test_model_dir_with_a_bad_newest_checkpoint_is_refused(trained, bad, capsys, mode):
    sentinel, model_dir = bad
    line = one_line_error(capsys, "CPU", "--params", trained[0], "--mode", mode, "--model_dir", model_dir,
                          "--max_steps", 4)
    assert_refused(line, ckpt.checkpoint_path(model_dir, 2))
    assert not sentinel.exists()
    assert [s for s, _ in ckpt.list_checkpoints(model_dir)] == [2]  # nothing trained or written over it


def test_genome_lm_load_refuses(bad):
    sentinel, model_dir = bad
    for source in (model_dir, ckpt.checkpoint_path(model_dir, 2)):
        with pytest.raises(CheckpointError) as info:
            GenomeLM.load(source)
        assert_refused(str(info.value), ckpt.checkpoint_path(model_dir, 2))
    assert not sentinel.exists()


def test_convert_checkpoint_refuses(tmp_path, bad, capsys):
    sentinel, model_dir = bad
    capsys.readouterr()
    code = convert_checkpoint.main(["--to", "hf", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert_refused(err.strip(), ckpt.checkpoint_path(model_dir, 2))
    assert not sentinel.exists() and not (tmp_path / "hf").exists()


# ------------------------------------------------------------------ what the trainer writes loads safely

def tensors_and_plain_data(value, where="state") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            tensors_and_plain_data(v, f"{where}[{k!r}]")
    elif type(value) in (list, tuple):
        for i, v in enumerate(value):
            tensors_and_plain_data(v, f"{where}[{i}]")
    else:
        assert isinstance(value, PLAIN), f"{where} is a {type(value).__name__}"


@pytest.mark.parametrize("backend,csx", [("CPU", None), ("CSX", "ram"), ("CSX", "disk")])
def test_trainer_checkpoints_are_tensors_and_plain_data(tmp_path, shards, capsys, backend, csx):  # noqa: F811
    extra = {"csx": {"memoryx": csx, "memoryx_dir": str(tmp_path / "mx")}} if csx else {}
    params = write_params(tmp_path / "p.yaml", steady_params(shards, tmp_path / "md", max_steps=2, **extra))
    assert cli_main([backend, "--params", str(params)]) == 0
    path = ckpt.checkpoint_path(tmp_path / "md", 2)
    state = torch.load(path, weights_only=True)  # torch's own allowlist, nothing added
    tensors_and_plain_data(state)
    assert {"model", "optimizer", "rng", "dataloader", "step", "params"} <= set(state)
    assert ckpt.load_checkpoint(path)["step"] == 2
    # and the run resumes from it
    assert cli_main([backend, "--params", str(params), "--max_steps", "3"]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "md")][-1] == 3


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random()


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    np.random.seed(3)
    np.random.randn()  # numpy keeps the second gaussian of a pair: it must come back too
    state = rng_state()
    expected = draws()
    path = ckpt.save_checkpoint(tmp_path, 1, {"model": {}, "step": 1, "rng": state})
    tensors_and_plain_data(torch.load(path, weights_only=True))
    set_rng_state(ckpt.load_checkpoint(path)["rng"])
    assert draws() == expected


def test_numpy_rng_state_of_earlier_versions_still_loads(tmp_path):
    """Earlier versions saved numpy's get_state() tuple (an ndarray of uint32 words): allowed
    through a handful of numpy types that only rebuild such an array."""
    np.random.seed(5)
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    expected = draws()
    path = tmp_path / "checkpoint_1.mdl"
    torch.save({"model": {}, "step": 1, "rng": old}, path)
    set_rng_state(ckpt.load_checkpoint(seal(path))["rng"])
    assert draws() == expected
    # other arrays (floats, objects) stay refused
    for array in (np.array([1.5]), np.array([Path("x")], dtype=object)):
        torch.save({"model": {}, "step": 1, "rng": {"numpy": array}}, path)
        with pytest.raises(CheckpointError) as info:
            ckpt.load_checkpoint(seal(path))
        assert_refused(str(info.value), path)


# ------------------------------------------------------------------ sealed, plain, but of the wrong types

def wrong_types(state: dict) -> dict[str, tuple[dict, str]]:
    """Variants of a real checkpoint's state, each with one field of the wrong type, and the
    field its message names."""
    name, first = next(iter(state["model"].items()))
    rng, opt = state["rng"], state["optimizer"]
    some = next(iter(opt["state"]))
    return {
        "step": ({**state, "step": "three"}, "field step: 'three'"),
        "negative step": ({**state, "step": -1}, "field step: -1"),
        "model value": ({**state, "model": {**state["model"], name: "weights"}}, f"field model[{name!r}]"),
        "model": ({**state, "model": [first]}, "field model: "),
        "params": ({**state, "params": 5}, "field params: 5 (int) is not text"),
        "torch rng size": ({**state, "rng": {**rng, "torch": rng["torch"][:100]}}, "field rng.torch: "),
        "numpy rng size": ({**state, "rng": {**rng, "numpy": {**rng["numpy"], "key": rng["numpy"]["key"][:7]}}},
                           "field rng.numpy: "),
        "python rng": ({**state, "rng": {**rng, "python": (3, (1, 2), None)}}, "field rng.python: "),
        "optimizer name": ({**state, "optimizer": {**opt, "state": {"no.such.weight": opt["state"][some]}}},
                           "field optimizer.state['no.such.weight']: the checkpoint's model has no tensor"),
        "optimizer state": ({**state, "optimizer": {**opt, "state": {some: {**opt["state"][some], "velocity": 1.0}}}},
                            f"field optimizer.state[{some!r}]['velocity']: not a state AdamW keeps"),
        "optimizer shape": ({**state, "optimizer": {**opt, "state": {some: {
            **opt["state"][some], "exp_avg": torch.zeros(3)}}}}, f"field optimizer.state[{some!r}]['exp_avg']: shape"),
        "optimizer type": ({**state, "optimizer": {**opt, "type": 7}}, "field optimizer: "),
        "optimizer value": ({**state, "optimizer": {**opt, "state": {some: {**opt["state"][some], "step": "1"}}}},
                            f"field optimizer.state[{some!r}]['step']: '1' (str) is not a tensor or number"),
        "dataloader": ({**state, "dataloader": {"epoch": "0", "batches_done": 2}}, "field dataloader: "),
    }


def sealed(path: Path, state: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return seal(path)


def test_every_field_of_the_wrong_type_is_one_line_naming_file_and_field(tmp_path, trained):
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(trained[1], 2))
    for case, (variant, field) in wrong_types(state).items():
        path = sealed(tmp_path / case.replace(" ", "_") / "checkpoint_2.mdl", variant)
        for load in (ckpt.load_checkpoint, GenomeLM.load):
            with pytest.raises(CheckpointError) as info:
                load(path)
            message = str(info.value)
            assert message.startswith(f"{path}: {field}") and "\n" not in message, (case, message)


@pytest.mark.parametrize("case", ["step", "model value", "torch rng size", "optimizer name"])
def test_every_loader_refuses_a_wrong_typed_checkpoint(tmp_path, trained, capsys, case):
    """run.py resume, --checkpoint_path, eval and eval_all: one line, exit 2, no checkpoint
    written or changed (eval_all records its params and log before it reads the checkpoints)."""
    params, trained_dir = trained
    variant, field = wrong_types(ckpt.load_checkpoint(ckpt.checkpoint_path(trained_dir, 2)))[case]
    model_dir = tmp_path / "bad_dir"
    path = sealed(ckpt.checkpoint_path(model_dir, 2), variant)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    for argv in (["--mode", "train", "--model_dir", model_dir, "--max_steps", 4],
                 ["--mode", "eval", "--model_dir", model_dir], ["--mode", "eval_all", "--model_dir", model_dir],
                 ["--mode", "train", "--model_dir", tmp_path / "fresh", "--checkpoint_path", path]):
        line = one_line_error(capsys, "CPU", "--params", params, *argv)
        assert line.startswith(f"error: {path}: {field}"), line
    after = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.name.startswith("checkpoint")}
    assert after == before and not (tmp_path / "fresh").exists()


def test_saved_params_of_the_wrong_shape_are_one_line_for_genome_lm_load(tmp_path, trained):
    """The params text a checkpoint carries is parsed by GenomeLM.load: a section that is not one,
    an unknown reading frame or a model section of the wrong type name the file and the key."""
    import yaml
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(trained[1], 2))
    saved = yaml.safe_load(state["params"])
    for case, params, said in [
        ("section", {**saved, "train_input": "x"}, "saved params train_input: 'x' is not a section"),
        ("frame", {**saved, "eval_input": {**saved["eval_input"], "reading_frame": 7}},
         "saved params eval_input.reading_frame: 7 is not one of as_read, longest_orf"),
        ("model", {**saved, "model": 5}, "saved params model: Input should be a valid dictionary"),
        ("size", {**saved, "model": {**saved["model"], "hidden_size": "two"}}, "saved params model.hidden_size: "),
    ]:
        path = sealed(tmp_path / case / "checkpoint_2.mdl", {**state, "params": yaml.safe_dump(params)})
        ckpt.load_checkpoint(path)  # its fields have their types: only the params text is wrong
        with pytest.raises(CheckpointError) as info:
            GenomeLM.load(path)
        assert str(info.value).startswith(f"{path}: {said}") and "\n" not in str(info.value), str(info.value)


def test_the_optimizer_state_table_is_what_torch_keeps():
    """checkpoint.OPTIMIZER_STATE against the state torch.optim keeps after a step, for every
    optimizer_type the params offer (with the options that add state: momentum, amsgrad)."""
    import typing

    from modelzoo.config import OptimizerConfig
    from modelzoo.training import optim
    for kind in typing.get_args(OptimizerConfig.model_fields["optimizer_type"].annotation):
        weight = torch.nn.Parameter(torch.ones(2, 2))
        optimizer = optim.build_optimizer([("w", weight)], OptimizerConfig(optimizer_type=kind, learning_rate=0.1,
                                                                           momentum=0.9))
        weight.grad = torch.ones(2, 2)
        optimizer.step()
        kept = set(optimizer.state[weight])
        if kind != "SGD":  # what amsgrad adds, should a checkpoint of torch's own Adam come along
            other = torch.nn.Parameter(torch.ones(2))
            amsgrad = type(optimizer)([other], amsgrad=True)
            other.grad = torch.ones(2)
            amsgrad.step()
            kept |= set(amsgrad.state[other])
        assert kept == ckpt.OPTIMIZER_STATE[type(optimizer).__name__], kind
