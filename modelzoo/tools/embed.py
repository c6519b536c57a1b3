"""Embed the genomes of a FASTA/GenBank file with a trained model.

    python -m modelzoo.tools.embed --model_dir MD --input genomes.fasta --output_dir OUT \\
        [--labels labels.tsv --label_column variant_group_derived]

OUT gets embeddings.npy (n x hidden_size, float32, in input order), ids.tsv (record id and label
per row) and a TensorBoard embedding projector: ``tensorboard --logdir OUT``, tab "Projector",
colour by the label. OUT appears complete or not at all.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from modelzoo.entry import OneLineParser, run_entry
from modelzoo.data.datasets import read_label_table
from modelzoo.data.sequences import read_records
from modelzoo.errors import ConfigError, DataError
from modelzoo.inference import POOLINGS, add_model_arguments, model_from_args

PROG = "python -m modelzoo.tools.embed"
NO_LABEL = "(none)"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--input", required=True, help="FASTA or GenBank file of genomes (plain or .gz)")
    p.add_argument("--output_dir", required=True, help="gets embeddings.npy, ids.tsv and the projector files")
    p.add_argument("--labels", help="TSV with a header row: one row per record id, e.g. its variant")
    p.add_argument("--label_column", help="--labels column shown in the projector")
    p.add_argument("--id_column", help="--labels column holding the record id (default: the first)")
    p.add_argument("--layer", type=int, default=-1, help="0 = token embeddings, k = after block k, -1 = last block")
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="mean over codons, or [CLS] (BERT)")
    p.add_argument("--bf16", action="store_true", help="compute in bfloat16 (autocast)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    return p


def embed(args) -> str:
    out = Path(args.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ConfigError(f"--output_dir {out}: exists and is not empty (use --overwrite)")
    if bool(args.labels) != bool(args.label_column):
        raise ConfigError("--labels and --label_column go together")
    records = list(read_records(args.input))
    labels = _labels_of(records, args) if args.labels else None
    lm = model_from_args(args)
    vectors = lm.embed(records, layer=args.layer, pooling=args.pooling, batch_size=args.batch_size,
                       bf16=args.bf16, progress=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        np.save(tmp / "embeddings.npy", vectors)
        header = ["id"] + ([args.label_column] if labels else [])
        rows = [[r.id] + ([labels[k]] if labels else []) for k, r in enumerate(records)]
        (tmp / "ids.tsv").write_text("\n".join("\t".join(row) for row in [header] + rows) + "\n")
        _write_projector(tmp, vectors, rows, header)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return (f"wrote {len(records)} embeddings of size {vectors.shape[1]} from {lm.source} to {out} "
            f"(view: tensorboard --logdir {out})")


def _labels_of(records, args) -> list[str]:
    table, _ = read_label_table(args.labels, args.label_column, args.id_column)
    if not any(r.id in table for r in records):
        raise DataError(f"{args.labels}: no row for any record of {args.input} (first id {records[0].id!r}; "
                        f"check --id_column)")
    return [table.get(r.id, NO_LABEL) for r in records]


def _write_projector(log_dir: Path, vectors: np.ndarray, rows: list[list[str]], header: list[str]) -> None:
    import torch
    from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

    with SummaryWriter(log_dir=str(log_dir)) as writer:
        # one metadata column is written without a header row; several need metadata_header
        metadata = [row[0] for row in rows] if len(header) == 1 else rows
        writer.add_embedding(torch.from_numpy(vectors), metadata=metadata,
                             metadata_header=header if len(header) > 1 else None, tag="embeddings")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_entry(lambda: embed(args))


if __name__ == "__main__":
    sys.exit(main())
