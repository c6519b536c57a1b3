"""Evaluate a trained model on genome tasks beside count and profile baselines from the same run.

    python -m modelzoo.tools.evaluate --model_dir MD --output_dir OUT \\
        --tasks perplexity,variants,mutation_effects,generation \\
        --train_fasta train.fasta.gz --eval_fasta held_out.fasta.gz \\
        [--labels labels.tsv --label_column variant] [--device cuda]

OUT gets results.json (every figure), results.md (one table: each task's figures, the model's
beside its baseline's, and whether the model beats it; then each task's details) and, for the
variants task, variants_map.png. Tasks (docs/evaluation.md says exactly what each measures):

- perplexity: per-codon perplexity on --eval_fasta beside interpolated (modified and plain)
  Kneser-Ney and Witten-Bell codon n-grams of every order 1..8 fitted on --train_fasta, over the
  codons the model scores;
- variants: leave-one-out 1-NN and 5-NN accuracy and k-means adjusted Rand index of --label_column
  for the model's default embeddings beside codon-frequency and nucleotide k-mer profiles;
- mutation_effects: zero-shot log-likelihood ratios of random synonymous, missense and nonsense
  substitutions in the coding region of each --cds_fasta record (default --eval_fasta), AUROCs
  beside the best n-gram's;
- generation: sequences sampled from ATG: intact reading frames, codon-usage distance to
  --train_fasta and nearest-training containment, beside the best n-gram's samples.

Inputs are streamed; the model runs on --device. OUT appears complete or not at all; --overwrite
replaces an earlier output of this tool only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from modelzoo.entry import OneLineParser, run_entry
from modelzoo.errors import ConfigError
from modelzoo.evaluation import report
from modelzoo.evaluation.harness import TASKS, EvalRun, Settings, check_inputs, check_settings
from modelzoo.evaluation.tasks import RUNNERS
from modelzoo.files import output_dir
from modelzoo.tools.common import add_model_arguments, model_from_args, model_inputs

PROG = "python -m modelzoo.tools.evaluate"
TOOL = "modelzoo.tools.evaluate"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{text!r}: expected comma-separated whole numbers, e.g. 4,5,6,7") from None


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--output_dir", required=True, help="gets results.json, results.md (and variants_map.png)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)} (default all)")
    p.add_argument("--train_fasta", help="FASTA/GenBank the baselines are fitted on (the model's training genomes)")
    p.add_argument("--eval_fasta", help="FASTA/GenBank of held-out genomes")
    p.add_argument("--labels", help="variants: TSV with a header row, one row per --eval_fasta record id")
    p.add_argument("--label_column", help="variants: the --labels column to predict")
    p.add_argument("--id_column", help="variants: the --labels column holding the record id (default: the first)")
    p.add_argument("--skip_labels", default="", help="variants: comma-separated labels to leave out (e.g. unassigned)")
    p.add_argument("--kmer_sizes", default="4,5,6,7", help="variants: nucleotide k-mer profile sizes (default 4,5,6,7)")
    p.add_argument("--max_order", type=int, default=8, help="highest codon n-gram order (default 8)")
    p.add_argument("--cds_fasta", help="mutation_effects: coding sequences (default --eval_fasta), read in the "
                                       "model's frame; substitutions go in each record's longest stop-free run")
    p.add_argument("--cds_features", help="mutation_effects: --cds_fasta is GenBank; use its features of this "
                                           "type (e.g. CDS), each read in the model's frame")
    p.add_argument("--mutations_per_class", type=int, default=4,
                   help="mutation_effects: substitutions per record and class (default 4)")
    p.add_argument("--mutation_records", type=int, help="mutation_effects: use only the first N records")
    p.add_argument("--llr_window", type=int, default=16,
                   help="mutation_effects: codons either side of the substituted one summed in the LLR (default 16)")
    p.add_argument("--num_generated", type=int, default=32, help="generation: sequences to sample (default 32)")
    p.add_argument("--generate_codons", type=int, default=300,
                   help="generation: codons per sequence, the ATG included (default 300)")
    p.add_argument("--temperature", type=float, default=1.0, help="generation: the model's sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="seed of substitutions, sampling and clustering (default 0)")
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # gone: precision follows the config
    p.add_argument("--no_map", action="store_true", help="variants: do not draw variants_map.png")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of this tool (never a directory holding other files)")
    return p


def settings_of(args) -> Settings:
    return Settings(train_fasta=args.train_fasta, eval_fasta=args.eval_fasta, cds_fasta=args.cds_fasta,
                    cds_features=args.cds_features,
                    labels=args.labels, label_column=args.label_column, id_column=args.id_column,
                    skip_labels=tuple(x.strip() for x in args.skip_labels.split(",") if x.strip()),
                    kmer_sizes=_ints(args.kmer_sizes), max_order=args.max_order,
                    mutations_per_class=args.mutations_per_class, mutation_records=args.mutation_records,
                    llr_window=args.llr_window, num_generated=args.num_generated,
                    generate_codons=args.generate_codons, temperature=args.temperature, seed=args.seed,
                    batch_size=args.batch_size, draw_map=not args.no_map)


def evaluate(args) -> str:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: name at least one task")
    settings = settings_of(args)
    check_settings(tasks, settings)
    if args.temperature <= 0:
        raise ConfigError(f"--temperature {args.temperature}: must be > 0")
    if args.bf16:
        raise ConfigError("--bf16 is gone: the model computes in the precision its params decide, as training does "
                          "(model.mixed_precision, and on a CPU model.mixed_precision_on_cpu)")
    check_inputs(tasks, settings)
    inputs = [args.train_fasta, args.eval_fasta, args.cds_fasta, args.labels, *model_inputs(args)]
    with output_dir(args.output_dir, TOOL, args.overwrite, inputs=inputs) as tmp:
        lm = model_from_args(args)
        settings.output = tmp
        run = EvalRun(lm, settings)
        results, seconds = {}, {}
        for task in dict.fromkeys(tasks):
            start = time.time()
            results[task] = RUNNERS[task](run)
            seconds[task] = round(time.time() - start, 1)
        header = {"model": {"source": lm.source, "step": lm.step, "name": lm.config.name,
                            "reading_frame": lm.reading_frame, "device": str(lm.device),
                            "precision": lm.precision},
                  "inputs": {"train_fasta": args.train_fasta, "eval_fasta": args.eval_fasta,
                             "cds_fasta": args.cds_fasta, "labels": args.labels},
                  "settings": {k: v for k, v in vars(settings).items() if k != "output"},
                  "seconds": seconds, "notes": run.notes}
        (tmp / report.JSON).write_text(report.to_json(header, results))
        (tmp / report.MARKDOWN).write_text(report.to_markdown(header, results))
    beaten = [r.model_beats_baseline for result in results.values() for r in result["summary"]]
    verdicts = [b for b in beaten if b is not None]
    return (f"evaluated {lm.source} on {', '.join(results)}: the model beats its baseline on {sum(verdicts)} of "
            f"{len(verdicts)} figures -> {Path(args.output_dir) / report.MARKDOWN}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_entry(lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
