"""Score the sequences of a FASTA/GenBank file by their log-likelihood under a trained model.

    python -m modelzoo.tools.score --model_dir MD --input genomes.fasta --output scores.tsv
    python -m modelzoo.tools.score --model_dir MD --input genomes.fasta --output codons.tsv --per_codon

scores.tsv has one row per record: id, scored codons, total log-likelihood (nats), its mean per
codon and the per-codon perplexity exp(-mean). GPT models score each codon given the earlier
ones of its window; BERT gives the pseudo-log-likelihood (one masked codon at a time). [UNK]
codons (N and other ambiguity codes) are not scored.

--per_codon writes one row per scored codon instead: id, codon_index (0-based position of the
codon in the sequence as the model reads it: from its first nucleotide, or in the frame of its
longest stop-free run for a model trained with reading_frame longest_orf), codon (its letters,
upper case), log_prob (natural log) and start (0-based position of the codon's first nucleotide
in the record, whitespace not counted). A codon that is not scored has no row: [UNK] codons, and under a GPT
model each sequence's first codon (nothing comes before it); a sequence's log_prob rows sum to
its log_likelihood. Records are read, scored and written a round at a time, in packed batches of
--batch_tokens (memory holds a round, not the file; --num_workers_per_node K shares the batches
among K processes, with the same output); the output appears complete or not at all. An existing file is replaced
only with --overwrite, and only when this tool wrote it (never an input or a user's file).
"""

from __future__ import annotations

import math
import sys

import numpy as np

from modelzoo.data.sequences import read_records
from modelzoo.distributed import exit_process
from modelzoo.entry import OneLineParser
from modelzoo.files import output_file
from modelzoo.inference_workers import run_tool
from modelzoo.tools.common import add_model_arguments, model_from_args, model_inputs

PROG = "python -m modelzoo.tools.score"
TOOL = "modelzoo.tools.score"  # the owner named in its output's modelzoo.files marker
COLUMNS = ("id", "scored_codons", "log_likelihood", "per_codon_log_likelihood", "perplexity")
PER_CODON_COLUMNS = ("id", "codon_index", "codon", "log_prob", "start")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_arguments(p, overwrite="replace an earlier --output of this tool (never another file)", packed=True)
    p.add_argument("--input", required=True, help="FASTA or GenBank file (plain or .gz)")
    p.add_argument("--output", required=True, help="TSV file to write")
    p.add_argument("--per_codon", action="store_true",
                   help="one row per scored codon (id, codon_index, codon, log_prob, start) instead of one per record")
    p.add_argument("--score_unk", action="store_true",
                   help="score [UNK] codons (N, ambiguity codes) too, as GenSLM does, for comparable numbers")
    return p


def score(args) -> str:
    scored = 0
    with output_file(args.output, TOOL, args.overwrite, inputs=[args.input, *model_inputs(args)]) as out:
        lm = model_from_args(args)
        if args.per_codon:
            out.write("\t".join(PER_CODON_COLUMNS) + "\n")
            for records, arrays in stream(lm, args):
                for rec, values in zip(records, arrays):
                    letters, offset = lm.codons(rec.seq)
                    out.writelines(f"{rec.id}\t{i}\t{letters[i]}\t{values[i]:.6g}\t{offset + 3 * i}\n"
                                   for i in scored_indices(values))
                scored += len(records)
            return f"scored the codons of {scored} sequences with {lm.source} -> {args.output}"
        out.write("\t".join(COLUMNS) + "\n")
        for records, (totals, counts) in stream(lm, args):
            for rec, total, n in zip(records, totals, counts):
                mean = total / n if n else math.nan
                out.write(f"{rec.id}\t{n}\t{total:.4f}\t{mean:.6f}\t{math.exp(-mean):.4f}\n")
            scored += len(records)
    return f"scored {scored} sequences with {lm.source} -> {args.output}"


def stream(lm, args):
    """The blocks of --input's scores (per codon with --per_codon), in input order."""
    scores = lm.codon_log_probs_stream if args.per_codon else lm.log_likelihood_stream
    return scores(read_records(args.input), batch_size=args.batch_size, progress=True, score_unk=args.score_unk,
                  batch_tokens=args.batch_tokens)


def scored_indices(values: np.ndarray) -> np.ndarray:
    """The codon indices that have a log-probability (``GenomeLM.codon_log_probs``: NaN = not scored)."""
    return np.flatnonzero(~np.isnan(values))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return run_tool(args, TOOL, argv, lambda: score(args), lambda: stream(model_from_args(args), args))


if __name__ == "__main__":
    exit_process(main())  # a worker of --num_workers_per_node skips finalisation, as a rank of run.py does
