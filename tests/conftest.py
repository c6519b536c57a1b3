"""Shared fixtures: tiny shard sets prepared from the real genomes in tests/data."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_preparation import prepare_genomes
from tests.helpers import CSX_SEQ, GENOMES


@pytest.fixture(scope="session")
def shards_msl64(tmp_path_factory) -> Path:
    """Three SARS-CoV-2 genomes as 64-codon windows: two genomes train, one val."""
    out = tmp_path_factory.mktemp("shards") / "msl64"
    assert prepare_genomes.main(["--input", str(GENOMES), "--output_dir", str(out), "--max_seq_length", "64",
                                 "--split", "0.67,0.33,0", "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def shards(shards_msl64) -> Path:
    """The same shards under the name the fault tests (resume, checkpoints, bad inputs) use."""
    return shards_msl64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The same genomes as CSX_SEQ-codon windows, 80% train and 20% val: what the backend
    comparisons (helpers.make_params) train on. One per test module, as their model_dirs default
    to data_dir/model."""
    out = tmp_path_factory.mktemp("csx_data") / "data"
    assert prepare_genomes.main(["--input", str(GENOMES), "--output_dir", str(out), "--max_seq_length",
                                 str(CSX_SEQ), "--split", "0.8,0.2,0.0", "--seed", "0"]) in (0, None)
    return out


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
