"""Build a params file's shard directories on first use (the ``prepare:`` key of an input section).

So the quickstart needs nothing but the raw genomes in the repo: the first run prepares them
with exactly the command a user would type, later runs find the shards and skip this.
"""

from __future__ import annotations

import logging
from pathlib import Path

from modelzoo.config import DataInput, Params
from modelzoo.errors import DataError

log = logging.getLogger("modelzoo")


def prepare_command(section: DataInput) -> list[str]:
    spec = section.prepare
    argv = ["--input", *spec.input, "--output_dir", str(Path(section.data_dir).parent),
            "--max_seq_length", str(section.max_seq_length), "--split", ",".join(map(str, spec.split)),
            "--seed", str(spec.seed)]
    return argv + (["--features", spec.features] if spec.features else [])


def ensure_prepared(params: Params) -> None:
    """Prepare every missing data_dir that has a ``prepare`` spec (sections sharing an output_dir
    are prepared once)."""
    from data_preparation import prepare_genomes

    for name in ("train_input", "eval_input"):
        section = getattr(params, name)
        if section is None or section.prepare is None or Path(section.data_dir).is_dir():
            continue
        out_dir = Path(section.data_dir).parent
        if out_dir.exists() and any(out_dir.iterdir()):
            raise DataError(f"{name}.data_dir: {section.data_dir} is missing but {out_dir} exists; "
                            "delete it to prepare again")
        argv = prepare_command(section)
        print("preparing shards: python -m data_preparation.prepare_genomes " + " ".join(argv), flush=True)
        report = prepare_genomes.prepare(prepare_genomes.parse_args(argv))
        prepare_genomes.print_report(report, str(out_dir))
        if not Path(section.data_dir).is_dir():
            raise DataError(f"{name}.data_dir: preparation wrote no {Path(section.data_dir).name} split "
                            f"(check prepare.split)")
