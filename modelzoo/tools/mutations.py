"""List the codons in which genomes differ from a reference, with how surprising the model finds them.

    python -m modelzoo.tools.mutations --model_dir MD --input genomes.fasta --reference ref.fasta \\
        --output_dir OUT

Each genome of --input is compared with the one record of --reference codon by codon by position
(both read in the model's reading frame, ``GenomeLM.codons``): codon i against codon i. OUT gets

- differences.tsv: one row per codon that differs: id, codon_index (0-based), reference_codon,
  codon, log_prob (the genome's codon under the model, natural log, as ``score --per_codon``
  gives it), rank (1 = the genome's least likely scored codon; ties share the lower rank) and
  scored_codons (how many codons were ranked). A differing codon that is not scored (under a
  GPT model, the first codon) has empty log_prob and rank.
- log_probs_NNNN_ID.png for the first --max_plots genomes: the log-probability of every codon
  along the genome, the differing codons marked in red, the least likely of them named.

Only whole A/C/G/T codons on both sides count as differences: a codon holding N, a gap ('-') or
another ambiguity code is no call. Comparing by position needs genomes of the reference's
length and frame (a reference with planted mutations, or the rows of a multiple alignment, whose
gaps are no calls): a genome whose codon count differs from the reference's is skipped, and the
closing line names it. Records are read and scored a batch at a time; OUT appears complete or
not at all; --overwrite replaces an earlier output of this tool only.
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import numpy as np

from modelzoo.data.sequences import read_records
from modelzoo.distributed import exit_process
from modelzoo.entry import OneLineParser
from modelzoo.errors import ConfigError, DataError
from modelzoo.files import output_dir
from modelzoo.inference_workers import run_tool
from modelzoo.tools.common import add_model_arguments, model_from_args, model_inputs
from modelzoo.tools.maps import draw_log_probs

PROG = "python -m modelzoo.tools.mutations"
TOOL = "modelzoo.tools.mutations"
TABLE = "differences.tsv"
COLUMNS = ("id", "codon_index", "reference_codon", "codon", "log_prob", "rank", "scored_codons")
CALLS = re.compile(r"[ACGT]{3}")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_arguments(p, overwrite="replace an earlier output of this tool (never a directory holding other files)",
                        packed=True)
    p.add_argument("--input", required=True, help="FASTA or GenBank file of genomes (plain or .gz)")
    p.add_argument("--reference", required=True, help="FASTA or GenBank file holding the one reference genome")
    p.add_argument("--output_dir", required=True, help=f"gets {TABLE} and a log-probability plot per genome")
    p.add_argument("--max_plots", type=int, default=20, help="plot the first N genomes (default 20; 0: none)")
    return p


def differences(reference: list[str], genome: list[str]) -> np.ndarray:
    """The codon indices at which two equally long codon lists hold different whole A/C/G/T codons."""
    return np.array([i for i, (a, b) in enumerate(zip(reference, genome))
                     if a != b and CALLS.fullmatch(a) and CALLS.fullmatch(b)], dtype=np.int64)


def ranks(values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The rank of each ``values[at]`` among the scored (non-NaN) values, lowest first from 1
    (ties share the lower rank); 0 where ``values[at]`` is not scored."""
    ordered = np.sort(values[~np.isnan(values)])
    picked = values[at]
    return np.where(np.isnan(picked), 0, np.searchsorted(ordered, picked, side="left") + 1)


def mutations(args) -> str:
    if args.max_plots < 0:
        raise ConfigError(f"--max_plots {args.max_plots}: must be >= 0")
    inputs = [args.input, args.reference, *model_inputs(args)]
    with output_dir(args.output_dir, TOOL, args.overwrite, inputs=inputs) as tmp:
        lm = model_from_args(args)
        ref_id, reference = _reference(args.reference, lm)
        genomes, found, skipped, plots = 0, 0, [], 0
        with open(tmp / TABLE, "w") as out:
            out.write("\t".join(COLUMNS) + "\n")
            for records, arrays in stream(lm, args):
                for rec, values in zip(records, arrays):
                    genomes += 1
                    letters, _ = lm.codons(rec.seq)
                    if len(letters) != len(reference):
                        skipped.append(f"{rec.id} ({len(letters)} codons)")
                        continue
                    at = differences(reference, letters)
                    rank = ranks(values, at)
                    scored = int((~np.isnan(values)).sum())
                    for i, r in zip(at.tolist(), rank.tolist()):
                        logp = "" if np.isnan(values[i]) else f"{values[i]:.6g}"
                        out.write(f"{rec.id}\t{i}\t{reference[i]}\t{letters[i]}\t{logp}\t{r or ''}\t{scored}\n")
                    found += len(at)
                    if plots < args.max_plots:
                        plots += 1
                        title = (f"{rec.id} against {ref_id}: {len(at)} differing codon{'s' * (len(at) != 1)}; "
                                 f"log-probabilities under {lm.config.name} {Path(lm.source).parent.name}/"
                                 f"{Path(lm.source).name}")
                        draw_log_probs(values, tmp / _plot_name(plots, rec.id), title,
                                       [(i, f"{i} {reference[i]}>{letters[i]}") for i in at.tolist()],
                                       marked_label="differs from the reference")
    note = ""
    if skipped:
        note = (f"; skipped {len(skipped)} of another length than the reference's {len(reference)} codons "
                f"(first: {skipped[0]})")
    return (f"{found} differing codons in {genomes - len(skipped)} genomes against {ref_id}, scored with "
            f"{lm.source} -> {Path(args.output_dir) / TABLE} and {plots} plots{note}")


def stream(lm, args):
    """The blocks of --input's per-codon log-probabilities, in input order."""
    return lm.codon_log_probs_stream(read_records(args.input), batch_size=args.batch_size, progress=True,
                                     batch_tokens=args.batch_tokens)


def _reference(path, lm) -> tuple[str, list[str]]:
    records = list(itertools.islice(read_records(path), 2))
    if len(records) != 1:
        raise DataError(f"--reference {path}: holds {'more than one record' if records else 'no record'}; "
                        f"give one reference genome")
    return records[0].id, lm.codons(records[0].seq)[0]


def _plot_name(number: int, record_id: str) -> str:
    return f"log_probs_{number:04d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', record_id)[:60]}.png"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return run_tool(args, TOOL, argv, lambda: mutations(args), lambda: stream(model_from_args(args), args))


if __name__ == "__main__":
    exit_process(main())  # a worker of --num_workers_per_node skips finalisation, as a rank of run.py does
