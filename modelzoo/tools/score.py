"""Score the sequences of a FASTA/GenBank file by their log-likelihood under a trained model.

    python -m modelzoo.tools.score --model_dir MD --input genomes.fasta --output scores.tsv

scores.tsv has one row per record: id, scored codons, total log-likelihood (nats), its mean per
codon and the per-codon perplexity exp(-mean). GPT-2/GPT-J score each codon given the ones
before it; BERT gives the pseudo-log-likelihood (one masked codon at a time). [UNK] codons (N
and other ambiguity codes) are not scored. Records are read, scored and written a batch at a
time (memory holds a batch, not the file); scores.tsv appears complete or not at all.
"""

from __future__ import annotations

import math
import sys

from modelzoo.data.sequences import read_records
from modelzoo.entry import OneLineParser, run_entry
from modelzoo.files import output_file
from modelzoo.inference import add_model_arguments, model_from_args

PROG = "python -m modelzoo.tools.score"
COLUMNS = ("id", "scored_codons", "log_likelihood", "per_codon_log_likelihood", "perplexity")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--input", required=True, help="FASTA or GenBank file (plain or .gz)")
    p.add_argument("--output", required=True, help="TSV file to write")
    return p


def score(args) -> str:
    scored = 0
    with output_file(args.output, inputs=[args.input, args.checkpoint_path or args.model_dir]) as out:
        lm = model_from_args(args)
        out.write("\t".join(COLUMNS) + "\n")
        blocks = lm.log_likelihood_stream(read_records(args.input), batch_size=args.batch_size, progress=True)
        for records, (totals, counts) in blocks:
            for rec, total, n in zip(records, totals, counts):
                mean = total / n if n else math.nan
                out.write(f"{rec.id}\t{n}\t{total:.4f}\t{mean:.6f}\t{math.exp(-mean):.4f}\n")
            scored += len(records)
    return f"scored {scored} sequences with {lm.source} -> {args.output}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_entry(lambda: score(args))


if __name__ == "__main__":
    sys.exit(main())
