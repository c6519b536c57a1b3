"""Embed the genomes of a FASTA/GenBank file with a trained model.

    python -m modelzoo.tools.embed --model_dir MD --input genomes.fasta --output_dir OUT \\
        [--labels labels.tsv --label_column variant_group_derived]

OUT gets embeddings.npy (n x hidden_size, float32, in input order), ids.tsv (record id and label
per row) and a TensorBoard embedding projector: ``tensorboard --logdir OUT``, tab "Projector",
colour by the label. With --labels it also gets map.png: every genome a dot on a 2-D t-SNE map
of its embedding, coloured by its label (unlabelled ones grey), with a legend of the groups and
their sizes (deterministic; --no_map skips it, t-SNE of very many genomes takes minutes). Records are read and embedded a round at a time, in packed
batches of --batch_tokens, and the vectors and ids stream to disk (memory holds a round, not the
input; only map.png needs every vector); --num_workers_per_node K shares the batches among K
processes, with the same output. OUT appears complete or not at all; --overwrite replaces an earlier output of
this tool only, never a directory holding anything else (or an input).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from modelzoo.data.datasets import read_label_table
from modelzoo.data.sequences import read_record_batches, read_records
from modelzoo.embedding_projector import write_projector
from modelzoo.distributed import exit_process
from modelzoo.entry import OneLineParser
from modelzoo.errors import ConfigError, DataError
from modelzoo.files import NpyRows, output_dir
from modelzoo.inference import POOLINGS
from modelzoo.inference_workers import run_tool
from modelzoo.tools.common import add_model_arguments, model_from_args, model_inputs, parse_layer
from modelzoo.tools.maps import NO_LABEL, draw_map

PROG = "python -m modelzoo.tools.embed"
TOOL = "modelzoo.tools.embed"  # the owner named in its output's modelzoo.files.OWNER_MARKER
MAP = "map.png"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_arguments(p, overwrite="replace an earlier output of this tool (never a directory holding other files)",
                        packed=True)
    p.add_argument("--input", required=True, help="FASTA or GenBank file of genomes (plain or .gz)")
    p.add_argument("--output_dir", required=True, help="gets embeddings.npy, ids.tsv and the projector files")
    p.add_argument("--labels", help="TSV with a header row: one row per record id, e.g. its variant")
    p.add_argument("--label_column", help="--labels column shown in the projector")
    p.add_argument("--id_column", help="--labels column holding the record id (default: the first)")
    p.add_argument("--layer", type=parse_layer, default=None,
                   help="0 = token embeddings, k = after block k, -1 = last block, final = the final norm's "
                        "output (default: 0 with surprise pooling, final with genslm, else -1)")
    p.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="surprise: codons weighted by their squared surprisal (GPT default); mean over codons "
                        "(BERT default); [CLS] (BERT); or genslm: GenSLM's recipe exactly (GPT: its tokens, "
                        "the first max_position_embeddings of them, final norm output averaged)")
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # gone: precision follows the config
    p.add_argument("--no_map", action="store_true", help="with --labels, do not draw map.png")
    return p


def embed(args) -> str:
    if bool(args.labels) != bool(args.label_column):
        raise ConfigError("--labels and --label_column go together")
    if args.bf16:
        raise ConfigError("--bf16 is gone: the model computes in the precision its params decide, as training does "
                          "(model.mixed_precision, and on a CPU model.mixed_precision_on_cpu)")
    inputs = [args.input, args.labels, *model_inputs(args)]
    with output_dir(args.output_dir, TOOL, args.overwrite, inputs=inputs) as tmp:
        table = _label_table(args) if args.labels else None
        lm = model_from_args(args)
        header = ["id"] + ([args.label_column] if table is not None else [])
        count = 0  # records written: ids.tsv and the vectors stream to disk (memory holds a round)
        with NpyRows(tmp / "embeddings.npy", (lm.config.hidden_size,)) as vectors, open(tmp / "ids.tsv", "w") as ids:
            ids.write("\t".join(header) + "\n")
            for records, block in stream(lm, args):
                vectors.append(block)
                ids.writelines("\t".join([r.id] + ([table.get(r.id, NO_LABEL)] if table is not None else [])) + "\n"
                               for r in records)
                count += len(records)
        write_projector(tmp, tmp / "embeddings.npy", tmp / "ids.tsv")
        drawn = table is not None and not args.no_map and count
        if drawn:
            labels = [line.split("\t")[1] for line in (tmp / "ids.tsv").read_text().splitlines()[1:]]
            source = Path(lm.source)
            pooling = args.pooling or lm.default_pooling
            layer = args.layer if args.layer is not None else lm.default_layer(pooling)
            title = (f"{lm.config.name} {source.parent.name}/{source.name}: layer {layer}, {pooling} "
                     f"pooling; colour: {args.label_column}")
            drawn = draw_map(np.load(tmp / "embeddings.npy"), labels, tmp / MAP, title)
    return (f"wrote {count} embeddings of size {lm.config.hidden_size} from {lm.source} to "
            f"{args.output_dir}{f' with a {drawn} map in {MAP}' if drawn else ''} "
            f"(view: tensorboard --logdir {args.output_dir})")


def stream(lm, args):
    """The (records, vectors) blocks of --input, in input order."""
    return lm.embed_stream(read_records(args.input), layer=args.layer, pooling=args.pooling, batch_size=args.batch_size,
                           progress=True, batch_tokens=args.batch_tokens)


def _label_table(args) -> dict[str, str]:
    """The --labels table, once it is known to name at least one record of --input (the ids are
    read without the sequences, before any model work)."""
    table, _ = read_label_table(args.labels, args.label_column, args.id_column)
    first = None
    for batch in read_record_batches(args.input):
        first = first or batch.ids[0]
        if not table.keys().isdisjoint(batch.ids):
            return table
    raise DataError(f"{args.labels}: no row for any record of {args.input} (first id {first!r}; "
                    f"check --id_column)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return run_tool(args, TOOL, argv, lambda: embed(args), lambda: stream(model_from_args(args), args))


if __name__ == "__main__":
    exit_process(main())  # a worker of --num_workers_per_node skips finalisation, as a rank of run.py does
