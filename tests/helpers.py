"""What the tests share (fixtures live in conftest.py), each once: where the fixture files are, a
FASTA of awkward formatting with Biopython's reading of it, a tiny model of every registered
architecture built from its spec's debug config, the one tiny training params, running the command
line in this process or as a user would, reading TensorBoard scalars, and the pieces of the two
kinds of exactness comparison: CSX against the resident CPU backend step by step, and N ranks
against one through run.py.

Every training run here is a tiny GPT-2 (hidden 32, 2 layers, MSL 64) on shards prepared from the
three Nextstrain genomes in tests/data, so a whole run takes well under a second of compute.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from Bio import SeqIO

from modelzoo import cli
from modelzoo.backends.csx import CSXBackend
from modelzoo.backends.resident import ResidentBackend
from modelzoo.config import ModelConfig, validate_params
from modelzoo.data.datasets import build_dataloader, dataset_for
from modelzoo.data.shards import ShardWriter
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.models import MODELS, build_model
from modelzoo.tools import convert_checkpoint
from modelzoo.trainer import split_micro_batches
from modelzoo.training.optim import learning_rate_at

DATA = Path(__file__).parent / "data"
GENOMES = DATA / "nextstrain_example_first3.fasta.gz"  # three SARS-CoV-2 genomes
REPO = Path(__file__).resolve().parent.parent
MSL = 64

# Line endings of three kinds, a blank line inside a record, tabs and '>' inside a header, a '>'
# inside a sequence line, spaces inside a sequence, a record with no sequence, no final newline.
AWKWARD_FASTA = (b">one first record\r\nACGTAC\r\nGGT\r\n\r\nTTA\r\n"
                 b">two\tdesc >not a new record\nacgu>ac\nAC GT\n"
                 b">three\rNNNACG\rT\r"
                 b">empty\n"
                 b">last\nACGTACGTA")


def biopython_records(data: bytes) -> list[tuple[str, str]]:
    """(id, sequence) of each record of FASTA bytes as Biopython reads them: the slow reference."""
    text = io.TextIOWrapper(io.BytesIO(data), encoding="latin-1", newline=None)
    return [(r.id, str(r.seq)) for r in SeqIO.parse(text, "fasta")]


# ------------------------------------------------------------------ tiny models

def tiny_config(name: str = "gpt2", **overrides) -> ModelConfig:
    """The model's spec's debug config (a spec may add to the shared tiny shape), with overrides."""
    return ModelConfig(**MODELS[name].debug_config(**overrides))


def tiny_model(name: str = "gpt2", seed: int = 0, **overrides) -> torch.nn.Module:
    """A freshly initialised tiny model of the architecture, the same weights for the same seed."""
    torch.manual_seed(seed)
    return build_model(tiny_config(name, **overrides))


# ------------------------------------------------------------------ tiny training params

def tiny_params(shards: Path, model_dir: Path, **runconfig) -> dict:
    """A GPT-2 small enough to train a few steps in a second or two."""
    return {
        "train_input": {"data_dir": str(shards / "train"), "batch_size": 4, "max_seq_length": MSL},
        "eval_input": {"data_dir": str(shards / "val"), "batch_size": 4, "max_seq_length": MSL, "shuffle": False},
        "model": {**MODELS["gpt2"].debug_config(), "dropout_rate": 0.1},
        "optimizer": {"optimizer_type": "AdamW", "weight_decay": 0.01, "max_gradient_norm": 1.0,
                      "learning_rate": [{"scheduler": "Linear", "initial_learning_rate": 0.0,
                                         "end_learning_rate": 0.003, "total_iters": 3},
                                        {"scheduler": "CosineDecay", "initial_learning_rate": 0.003,
                                         "end_learning_rate": 0.0003, "total_iters": 20}]},
        "runconfig": {"model_dir": str(model_dir), "max_steps": 6, "log_steps": 1, "checkpoint_steps": 3,
                      "eval_steps": 2, **runconfig},
    }


def steady_params(shards: Path, model_dir: Path, **runconfig) -> dict:
    """tiny_params as the fault tests count on it: a checkpoint every 2 steps, no evaluation during
    training, a constant learning rate, 2 attention heads, evaluation data shuffled (the default)."""
    params = tiny_params(shards, model_dir, **{"checkpoint_steps": 2, **runconfig})
    if "eval_steps" not in runconfig:
        del params["runconfig"]["eval_steps"]
    del params["eval_input"]["shuffle"]
    params["model"]["num_heads"] = 2
    params["optimizer"] = {"optimizer_type": "AdamW", "learning_rate": 1e-3, "weight_decay": 0.01}
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def params_file(tmp_path: Path, shards: Path, name: str = "params.yaml", **runconfig) -> Path:
    """steady_params written to tmp_path/name, with model_dir tmp_path/model_dir unless overridden."""
    return write_params(tmp_path / name, steady_params(shards, tmp_path / "model_dir", **runconfig))


def modelzoo_fixture(name: str, tmp_path: Path, shards: Path, labels: Path | None = None, edit=None) -> Path:
    """A Model Zoo params file of tests/data/modelzoo with its data and model_dir filled in (and
    ``edit`` applied to the text)."""
    text = (DATA / "modelzoo" / name).read_text().replace("$SHARDS", str(shards))
    text = text.replace("$MODEL_DIR", str(tmp_path / "md")).replace("$LABELS", str(labels))
    path = tmp_path / name
    path.write_text(edit(text) if edit else text)
    return path


# ------------------------------------------------------------------ the command line

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """python run.py ARGV in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv, code: int = 2) -> str:
    """Run the CLI, expect the exit code and exactly one 'error: ...' line on stderr; return it.

    Progress bars may precede it (tqdm writes to stderr); a traceback may not.
    """
    got, _, err = run_cli(capsys, *argv)
    assert got == code, err
    return error_line(err)


def error_line(stderr: str) -> str:
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def train_cpu(capsys, params_path, *flags) -> str:
    """run.py CPU --params PARAMS_PATH FLAGS in this process, which must succeed: its stdout."""
    code, out, err = run_cli(capsys, "CPU", "--params", params_path, *flags)
    assert code == 0, err
    return out


def convert(capsys, *argv) -> tuple[int, str]:
    """python -m modelzoo.tools.convert_checkpoint ARGV in this process: (exit code, its output)."""
    code = convert_checkpoint.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def run_py_command(*argv) -> list[str]:
    return [sys.executable, str(REPO / "run.py"), *[str(a) for a in argv]]


def run_py(cwd: Path, device: str, *args: str) -> subprocess.CompletedProcess:
    """python run.py DEVICE ARGS in a process of its own (ranks start their own), which must succeed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(run_py_command(device, *args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def tensorboard_scalars(phase_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one tag over every event file in phase_dir (later files win)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    values = {}
    for path in sorted(phase_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if v.tag == tag:
                    values[event.step] = v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0]
    return values


# ------------------------------------------------------------------ CSX against the resident CPU backend, step by step

CSX_SEQ, CSX_STEPS = 32, 20


def make_params(data_dir, model_name="gpt2", *, dropout=0.1, accum=2, clip=1.0, csx=None, batch=4,
                mixed=False, tmp=None, **run):
    """Validated params of a tiny model on data_dir (conftest's data_dir): warm-up and cosine decay,
    clipping, micro-batches and dropout, so a comparison exercises each."""
    model = MODELS[model_name].debug_config(max_position_embeddings=CSX_SEQ, dropout_rate=dropout,
                                            attention_dropout_rate=dropout, mixed_precision=mixed)
    raw = {"train_input": {"data_dir": str(data_dir / "train"), "batch_size": batch, "max_seq_length": CSX_SEQ},
           "eval_input": {"data_dir": str(data_dir / "val"), "batch_size": 2, "max_seq_length": CSX_SEQ},
           "model": model,
           "optimizer": {"optimizer_type": "AdamW", "weight_decay": 0.01, "max_gradient_norm": clip,
                         "grad_accum_steps": accum,
                         "learning_rate": [{"scheduler": "Linear", "initial_learning_rate": 0.0,
                                            "end_learning_rate": 3e-3, "total_iters": 5},
                                           {"scheduler": "CosineDecay", "initial_learning_rate": 3e-3,
                                            "end_learning_rate": 1e-4, "total_iters": 15}]},
           "runconfig": {"seed": 7, "model_dir": str(tmp or data_dir / "model"), "csx": csx or {}, **run}}
    return validate_params(raw)


def make_backend(kind, params):
    return ResidentBackend("cpu") if kind == "cpu" else CSXBackend(params)


def train(kind, params, steps=CSX_STEPS, backend=None):
    """Losses and grad norms of `steps` steps, from a model built under the params' seed."""
    torch.manual_seed(params.runconfig.seed)
    if backend is None:
        backend = make_backend(kind, params)
        backend.setup(build_model(params.model), params.optimizer)
    cfg = params.train_input
    cls, kwargs = dataset_for(params.model, cfg, params.runconfig.seed)
    loader = build_dataloader(cfg.data_dir, cfg.batch_size, shuffle=True, shuffle_seed=0,
                              max_seq_length=CSX_SEQ, dataset_cls=cls, dataset_kwargs=kwargs)
    batches, curve = iter(loader), []
    for step in range(steps):
        lr = learning_rate_at(step, params.optimizer)
        m = backend.train_step(split_micro_batches(next(batches), params.optimizer.grad_accum_steps), lr)
        curve.append((m["loss"], m["grad_norm"]))
    return curve, backend


def assert_close_curves(a, b, rel=1e-5):
    for step, ((la, na), (lb, nb)) in enumerate(zip(a, b)):
        assert math.isclose(la, lb, rel_tol=rel), f"step {step + 1}: loss {la} vs {lb}"
        assert math.isclose(na, nb, rel_tol=rel), f"step {step + 1}: grad_norm {na} vs {nb}"


# ------------------------------------------------------------------ N ranks against one, through run.py
# The windows are padded unevenly, so ranks hold different numbers of labelled tokens, and SGD is
# used: only an exact global-token normalisation and a SUM of the ranks' gradients reproduce one
# rank (Adam would hide a factor of 2).

RANKS_SEQ, RANKS_STEPS = 32, 10


def write_shards(out: Path, n: int, seed: int) -> None:
    """n windows of 6 to RANKS_SEQ random codons, padded to RANKS_SEQ."""
    tok = CodonTokenizer()
    rng = np.random.default_rng(seed)
    rows = np.full((n, RANKS_SEQ), tok.pad_id, dtype=np.uint8)
    for i, fill in enumerate(rng.integers(6, RANKS_SEQ + 1, size=n)):
        rows[i, :fill] = rng.integers(5, 69, size=fill)
    with ShardWriter(out, RANKS_SEQ, tok, command="test_data_parallel") as w:
        w.add("synthetic", rows)


def ranks_params(path: Path, mode: str = "train_and_eval", *, grad_accum_steps: int = 2, clip: float | None = None,
                 extra: dict | None = None, **runconfig) -> Path:
    """Params of a tiny GPT-2 on write_shards' data/train and data/val (relative to the run's
    directory), written to path; ``extra`` adds keys to whole sections."""
    optimizer = {"optimizer_type": "SGD", "learning_rate": 0.5, "momentum": 0.9, "grad_accum_steps": grad_accum_steps}
    if clip is not None:
        optimizer["max_gradient_norm"] = clip
    params = {
        "train_input": {"data_dir": "data/train", "batch_size": 8, "max_seq_length": RANKS_SEQ, "shuffle": True},
        "eval_input": {"data_dir": "data/val", "batch_size": 8, "max_seq_length": RANKS_SEQ, "shuffle": False},
        # GPT-2: its tied embedding and head share FSDP's root unit; every block has its own
        "model": MODELS["gpt2"].debug_config(num_heads=2, max_position_embeddings=RANKS_SEQ),
        "optimizer": optimizer,
        "runconfig": {"mode": mode, "max_steps": RANKS_STEPS, "log_steps": 1, "seed": 3, **runconfig},
    }
    for section, values in (extra or {}).items():
        params[section] = {**params.get(section, {}), **values}
    path.write_text(yaml.safe_dump(params))
    return path


def checkpoint(run_dir: Path, step: int = RANKS_STEPS) -> dict:
    return torch.load(run_dir / f"checkpoint_{step}.mdl", weights_only=False)


def assert_same_curve(got: dict, want: dict, steps) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0), f"step {step}"


def assert_same_curves(run_dir: Path, one_rank: Path) -> None:
    """A run's training loss and gradient norm at every step, and its evaluation's loss and accuracy
    (summed over the ranks' halves of every batch), as one rank's."""
    for tag in ("loss", "grad_norm"):
        assert_same_curve(tensorboard_scalars(run_dir / "train", tag), tensorboard_scalars(one_rank / "train", tag),
                          range(1, RANKS_STEPS + 1))
    for tag in ("loss", "accuracy"):
        assert_same_curve(tensorboard_scalars(run_dir / "eval", tag), tensorboard_scalars(one_rank / "eval", tag),
                          [RANKS_STEPS])


def assert_same_state(ours: dict, theirs: dict) -> None:
    assert ours["model"].keys() == theirs["model"].keys()  # the bare model's names, whole tensors
    for k in ours["model"]:
        torch.testing.assert_close(ours["model"][k], theirs["model"][k], rtol=1e-4, atol=1e-6)
    assert ours["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    for name, values in ours["optimizer"]["state"].items():
        for key, value in values.items():
            torch.testing.assert_close(value, theirs["optimizer"]["state"][name][key], rtol=1e-4, atol=1e-6)
