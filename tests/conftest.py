"""Shared fixtures: tiny shard sets prepared from the real genomes in tests/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from data_preparation import prepare_genomes

DATA = Path(__file__).parent / "data"
GENOMES = DATA / "nextstrain_example_first3.fasta.gz"


@pytest.fixture(scope="session")
def shards_msl64(tmp_path_factory) -> Path:
    """Three SARS-CoV-2 genomes as 64-codon windows: two genomes train, one val."""
    out = tmp_path_factory.mktemp("shards") / "msl64"
    assert prepare_genomes.main(["--input", str(GENOMES), "--output_dir", str(out), "--max_seq_length", "64",
                                 "--split", "0.67,0.33,0", "--seed", "0"]) == 0
    return out


def tiny_params(shards: Path, model_dir: Path, **runconfig) -> dict:
    """A GPT-2 small enough to train a few steps in a second or two."""
    return {
        "train_input": {"data_dir": str(shards / "train"), "batch_size": 4, "max_seq_length": 64},
        "eval_input": {"data_dir": str(shards / "val"), "batch_size": 4, "max_seq_length": 64, "shuffle": False},
        "model": {"name": "gpt2", "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 4,
                  "max_position_embeddings": 64, "dropout_rate": 0.1},
        "optimizer": {"optimizer_type": "AdamW", "weight_decay": 0.01, "max_gradient_norm": 1.0,
                      "learning_rate": [{"scheduler": "Linear", "initial_learning_rate": 0.0,
                                         "end_learning_rate": 0.003, "total_iters": 3},
                                        {"scheduler": "CosineDecay", "initial_learning_rate": 0.003,
                                         "end_learning_rate": 0.0003, "total_iters": 20}]},
        "runconfig": {"model_dir": str(model_dir), "max_steps": 6, "log_steps": 1, "checkpoint_steps": 3,
                      "eval_steps": 2, **runconfig},
    }


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def one_thread():
    """torch on one thread: for tests of tiny tensors, where on a busy machine waking OpenMP
    workers costs more than the math."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _pristine_modelzoo_logger():
    """A run in the test process configures the "modelzoo" logger (its own handlers, no
    propagation); every test starts from the logger as a fresh process has it, whatever ran
    before and in whatever order."""
    import logging
    logger = logging.getLogger("modelzoo")

    def reset():
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            if not type(handler).__module__.startswith("_pytest"):  # pytest closes its own
                handler.close()
        logger.propagate, logger.level = True, logging.NOTSET

    reset()
    yield
    reset()
