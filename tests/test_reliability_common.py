"""Shared set-up of the reliability tests (tests/test_reliability_*.py); holds no tests itself.

Every run is a tiny GPT-2 (hidden 32, 2 layers, MSL 64) on shards prepared from the three
Nextstrain genomes, so a whole training run takes well under a second of compute.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from data_preparation.prepare_genomes import main as prepare_main
from modelzoo import cli

DATA = Path(__file__).parent / "data"
FIRST3 = DATA / "nextstrain_example_first3.fasta.gz"
REPO = Path(__file__).resolve().parent.parent
MSL = 64


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """train/ (2 genomes, 312 windows) and val/ (1 genome) shard dirs of 64 codons."""
    out = tmp_path_factory.mktemp("shards") / "data"
    assert prepare_main(["--input", str(FIRST3), "--output_dir", str(out), "--max_seq_length", str(MSL),
                         "--split", "0.67,0.33,0"]) == 0
    return out


def params_dict(shards: Path, model_dir: Path, **runconfig) -> dict:
    return {
        "train_input": {"data_dir": str(shards / "train"), "batch_size": 4, "max_seq_length": MSL},
        "eval_input": {"data_dir": str(shards / "val"), "batch_size": 4, "max_seq_length": MSL},
        "model": {"name": "gpt2", "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2,
                  "max_position_embeddings": MSL, "dropout_rate": 0.1},
        "optimizer": {"optimizer_type": "AdamW", "learning_rate": 1e-3, "weight_decay": 0.01},
        "runconfig": {"model_dir": str(model_dir), "max_steps": 6, "log_steps": 1, "checkpoint_steps": 2,
                      **runconfig},
    }


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def tiny_params(tmp_path: Path, shards: Path, name: str = "params.yaml", **runconfig) -> Path:
    """A params yaml for the tiny run, with model_dir tmp_path/model_dir unless overridden."""
    return write_params(tmp_path / name, params_dict(shards, tmp_path / "model_dir", **runconfig))


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
