"""What the tests share (fixtures live in conftest.py): where the fixture files are, a tiny model of
every registered architecture built from its spec's debug config, the one tiny training params, and
running the command line in this process or as a user would.

Every training run here is a tiny GPT-2 (hidden 32, 2 layers, MSL 64) on shards prepared from the
three Nextstrain genomes in tests/data, so a whole run takes well under a second of compute.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from modelzoo import cli
from modelzoo.config import ModelConfig
from modelzoo.models import MODELS, build_model

DATA = Path(__file__).parent / "data"
GENOMES = DATA / "nextstrain_example_first3.fasta.gz"  # three SARS-CoV-2 genomes
REPO = Path(__file__).resolve().parent.parent
MSL = 64


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


def run_py_command(*argv) -> list[str]:
    return [sys.executable, str(REPO / "run.py"), *[str(a) for a in argv]]


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
