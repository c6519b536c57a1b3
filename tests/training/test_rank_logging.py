"""Ranks other than 0 log to their own file (model_dir/run.rank{R}.log), and only warnings reach
their console, also inside the trainer's progress bar (tqdm's logging_redirect_tqdm swaps console
handlers for its own, which printed every INFO line of rank 1 too); rank 0 is unchanged."""

from __future__ import annotations

import logging

from tqdm.contrib.logging import logging_redirect_tqdm

from modelzoo.training.metrics import close_logging, setup_logging

log = logging.getLogger("modelzoo")


def log_a_run(model_dir, rank: int) -> None:
    """What cli._execute does around a run: logging before model_dir exists, then with it, the
    step lines inside the trainer's tqdm redirection."""
    setup_logging(None, rank)
    log.info("loaded checkpoint_2.mdl")
    if rank == 0:  # rank 0 makes model_dir once the inputs are read; the others may come first
        model_dir.mkdir()
    setup_logging(model_dir, rank)
    with logging_redirect_tqdm([log]):
        log.info("step 1 | loss 4.2")
        log.warning("step 2: non-finite loss, batch skipped")
    close_logging()


def test_rank_1_logs_to_its_own_file_and_warns_on_the_console(tmp_path, capsys):
    capsys.readouterr()
    log_a_run(tmp_path / "md", rank=1)
    console = capsys.readouterr().out
    assert "step 1 | loss" not in console and "loaded" not in console
    assert console.count("WARNING step 2: non-finite loss") == 1
    lines = (tmp_path / "md" / "run.rank1.log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "INFO loaded checkpoint_2.mdl", "INFO step 1 | loss 4.2", "WARNING step 2: non-finite loss, batch skipped"]
    assert not (tmp_path / "md" / "run.log").exists()


def test_rank_0_is_unchanged(tmp_path, capsys):
    capsys.readouterr()
    log_a_run(tmp_path / "md", rank=0)
    console = capsys.readouterr()
    assert console.out.count("INFO step 1 | loss 4.2") + console.err.count("INFO step 1 | loss 4.2") == 1
    text = (tmp_path / "md" / "run.log").read_text()
    assert "INFO loaded checkpoint_2.mdl" in text and "INFO step 1 | loss 4.2" in text
    assert [p.name for p in (tmp_path / "md").iterdir()] == ["run.log"]
