"""GenSLM's recipe, run end to end: genes first, then genomes, then the evaluation harness.

    python examples/genslm_recipe.py [--root model_dir/genslm_recipe] [--device CPU]

1. Pretrains a small codon GPT-NeoX on the prokaryotic genes shipped in data/prokaryotic/, packed
   (examples/genslm_recipe_genes.yaml).
2. Fine-tunes it on the SARS-CoV-2 genomes of 2020 with a longer context
   (examples/genslm_recipe_genomes.yaml: the genes checkpoint's model state only), and trains the
   same model on the genomes alone from random weights with the same budget; a third run trains
   only LoRA adapters on the gene-pretrained weights (examples/genslm_recipe_genomes_lora.yaml;
   --no_lora skips it).
3. Runs ``python -m modelzoo.tools.evaluate`` on each fine-tuned model over the unseen-variant
   genomes of 2020-2023 (data/sars_cov_2/genbank_multiclade_*), baselines fitted on the training
   genomes.
4. Prints the table: each figure for each model beside its baseline and the issue's target.

Every stage is ``run.py`` or the harness in a subprocess, as a user runs them. Re-running the
command reuses what is finished (a model_dir whose newest checkpoint reached the params'
max_steps, a harness output with its results.json) and resumes what is not (run.py resumes from
model_dir). Everything is written under --root; the table also goes to --root/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, without installing the package

from modelzoo.training.checkpoint import newest_good_checkpoint  # noqa: E402

EXAMPLES = ROOT / "examples"
SARS = ROOT / "data" / "sars_cov_2"
TRAIN_FASTA = SARS / "nextstrain_2020_example_sequences.fasta.gz"
EVAL_FASTA = SARS / "genbank_multiclade_sequences.fasta.gz"
LABELS = SARS / "genbank_multiclade_labels_derived.tsv"
LABEL_COLUMN = "variant_group_derived"
TASKS = "perplexity,variants,mutation_effects,generation"
TIMINGS = "wall_times.json"  # stage -> seconds, kept under --root so a re-run still reports them


@dataclass
class Stage:
    """One run.py training run into root/name."""
    name: str
    params: Path
    start_from: str | None = None  # another stage whose final checkpoint gives the model state
    label: str = ""
    extra: list[str] = field(default_factory=list)


STAGES = [
    Stage("genes", EXAMPLES / "genslm_recipe_genes.yaml", label="genes only (no genome fine-tune)"),
    Stage("genomes_pretrained", EXAMPLES / "genslm_recipe_genomes.yaml", start_from="genes",
          label="genes, then genomes (full fine-tune)"),
    Stage("genomes_scratch", EXAMPLES / "genslm_recipe_genomes.yaml", label="genomes only (random start)"),
]
LORA_STAGE = Stage("genomes_lora", EXAMPLES / "genslm_recipe_genomes_lora.yaml", start_from="genes",
                   label="genes, then genomes (LoRA adapters)")
EVALUATED = ("genomes_pretrained", "genomes_scratch", "genomes_lora")

# The targets, by the metric's name in the harness: (wording, the bar, whether a figure meets it),
# both given the figure's baseline in the same harness run and the 6-mer profiles' 1-NN accuracy
TARGETS = {
    "per-codon perplexity": ("below the best codon n-gram", lambda base, kmer6: base,
                             lambda value, base, kmer6: value < base),
    "variant 1-NN accuracy (leave-one-out)": (">= 0.90 and above 6-mer profiles", lambda base, kmer6: max(0.90, kmer6),
                                              lambda value, base, kmer6: value >= 0.90 and value > kmer6),
    "AUROC nonsense vs synonymous (score: -LLR)": (">= 0.95", lambda base, kmer6: 0.95,
                                                   lambda value, base, kmer6: value >= 0.95),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(ROOT / "model_dir" / "genslm_recipe"),
                   help="every model_dir and harness output goes under this directory")
    p.add_argument("--device", default="CPU", choices=("CPU", "GPU", "CSX"), help="run.py's device")
    p.add_argument("--eval_device", default="cpu", help="the harness's torch device (e.g. cuda)")
    p.add_argument("--no_lora", action="store_true",
                   help="skip the LoRA fine-tune (examples/genslm_recipe_genomes_lora.yaml)")
    p.add_argument("--eval_batch_size", type=int, default=8, help="the harness's --batch_size")
    p.add_argument("--mutation_records", type=int, default=24,
                   help="the harness's --mutation_records: unseen genomes that get substitutions")
    p.add_argument("--num_generated", type=int, default=16, help="the harness's --num_generated")
    p.add_argument("--train_only", action="store_true", help="stop after training (no harness, no table)")
    args = p.parse_args(argv)
    for name in ("eval_batch_size", "mutation_records", "num_generated"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be at least 1")
    return args


# ---------------------------------------------------------------------- stages

def max_steps(params: Path) -> int:
    return int(yaml.safe_load(params.read_text())["runconfig"]["max_steps"])


def final_checkpoint(model_dir: Path, params: Path) -> Path | None:
    """The checkpoint a finished run leaves, or None while the run has not reached max_steps."""
    newest = newest_good_checkpoint(model_dir) if model_dir.is_dir() else None
    if newest is None or int(newest.stem.split("_")[-1]) < max_steps(params):
        return None
    return newest


def train_command(stage: Stage, root: Path, device: str) -> list[str]:
    cmd = [sys.executable, str(ROOT / "run.py"), device, "--params", str(stage.params),
           "--model_dir", str(root / stage.name), *stage.extra]
    if stage.start_from:
        start = final_checkpoint(root / stage.start_from, next(s for s in STAGES if s.name == stage.start_from).params)
        if start is None:
            raise SystemExit(f"{stage.name}: {root / stage.start_from} has no finished checkpoint to start from")
        cmd += ["--checkpoint_path", str(start), "--load_checkpoint_states", "model"]
    return cmd


def eval_command(name: str, root: Path, args) -> list[str]:
    return [sys.executable, "-m", "modelzoo.tools.evaluate", "--model_dir", str(root / name),
            "--output_dir", str(root / f"eval_{name}"), "--tasks", TASKS, "--device", args.eval_device,
            "--train_fasta", str(TRAIN_FASTA), "--eval_fasta", str(EVAL_FASTA), "--labels", str(LABELS),
            "--label_column", LABEL_COLUMN, "--skip_labels", "unassigned",
            "--batch_size", str(args.eval_batch_size), "--mutation_records", str(args.mutation_records),
            "--num_generated", str(args.num_generated)]


def logged_seconds(model_dir: Path) -> int | None:
    """First to last timestamped line of a run.log: the wall time of a run this script did not time
    (started by hand with the same command; a resumed run's pause counts too)."""
    stamps = []
    log = model_dir / "run.log"
    for line in (log.read_text(errors="replace").splitlines() if log.is_file() else []):
        with contextlib.suppress(ValueError):
            stamps.append(datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
    return round((stamps[-1] - stamps[0]).total_seconds()) if len(stamps) > 1 else None


def run_timed(key: str, cmd: list[str], root: Path, timings: dict) -> None:
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    timings[key] = round(time.time() - start)
    (root / TIMINGS).write_text(json.dumps(timings, indent=1) + "\n")


# ---------------------------------------------------------------------- table

def summary_rows(results: dict) -> dict[str, dict]:
    """metric -> the harness's summary row, over every task."""
    return {row["metric"]: row for task in results["tasks"].values() for row in task["summary"]}


def kmer_1nn(results: dict, k: int = 6) -> float:
    for rep in results["tasks"]["variants"]["representations"]:
        if rep["representation"].startswith(f"nucleotide {k}-mer"):
            return rep["knn1"]
    return math.nan


def _fig(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


def target_cell(metric: str, value, base: float, kmer6: float) -> str:
    """The figure, and whether it meets the issue's target or by how much it misses the bar."""
    if value is None or not math.isfinite(value):
        return "n/a"
    _, bar, meets = TARGETS[metric]
    if meets(value, base, kmer6):
        return f"{value:.4g} (met)"
    return f"{value:.4g} (misses by {abs(value - bar(base, kmer6)):.3g})"


def render_table(evaluated: dict[str, dict], labels: dict[str, str]) -> list[str]:
    """One row per summary figure of the harness: each model, the baseline, and the issue's target
    where it sets one (each model's cell then says whether it meets it, or by how much it misses)."""
    names = list(evaluated)
    rows = {name: summary_rows(res) for name, res in evaluated.items()}
    kmer6 = {name: kmer_1nn(res) for name, res in evaluated.items()}
    head = ["metric", *[labels[n] for n in names], "baseline (same harness run)", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, row in rows[names[0]].items():
        cells = []
        for n in names:
            value = rows[n].get(metric, {}).get("model")
            if metric in TARGETS:
                cells.append(target_cell(metric, value, rows[n][metric]["baseline_value"], kmer6[n]))
            else:
                cells.append(_fig(value))
        target = TARGETS[metric][0] if metric in TARGETS else (f"{row['better']} is better" if row.get("better") else "-")
        lines.append("| " + " | ".join([metric, *cells, f"{row['baseline']}: {_fig(row['baseline_value'])}", target])
                     + " |")
    lines.append("| variant 1-NN, nucleotide 6-mer profiles | " + " | ".join(_fig(kmer6[n]) for n in names)
                 + " | - | - |")
    return lines


def render(evaluated: dict[str, dict], labels: dict[str, str], timings: dict, args) -> str:
    lines = ["# GenSLM's recipe: genes, then genomes, evaluated on unseen variants", "",
             f"Command: `python examples/genslm_recipe.py --root {args.root}`. Harness settings: "
             f"--mutation_records {args.mutation_records}, --num_generated {args.num_generated}.", ""]
    if evaluated:
        lines += render_table(evaluated, labels)
    order = [s.name for s in STAGES + [LORA_STAGE]]
    ranked = sorted(timings, key=lambda k: (not k.startswith("train"), order.index(k.split()[-1])
                                            if k.split()[-1] in order else len(order)))
    lines += ["", "Wall times (s): " + ", ".join(f"{k} {timings[k]}" for k in ranked), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    timings = json.loads((root / TIMINGS).read_text()) if (root / TIMINGS).is_file() else {}
    stages = STAGES + ([] if args.no_lora else [LORA_STAGE])
    for stage in stages:
        if final_checkpoint(root / stage.name, stage.params) is not None:
            print(f"{stage.name}: finished in {root / stage.name}, reused", flush=True)
            if f"train {stage.name}" not in timings and logged_seconds(root / stage.name) is not None:
                timings[f"train {stage.name}"] = logged_seconds(root / stage.name)
            continue
        run_timed(f"train {stage.name}", train_command(stage, root, args.device), root, timings)
    if args.train_only:
        return 0
    evaluated = {}
    for name in (s.name for s in stages if s.name in EVALUATED):
        out = root / f"eval_{name}" / "results.json"
        if not out.is_file():
            run_timed(f"evaluate {name}", eval_command(name, root, args), root, timings)
        evaluated[name] = json.loads(out.read_text())
        timings.setdefault(f"evaluate {name}", round(sum(evaluated[name]["seconds"].values())))  # its tasks' own clock
    table = render(evaluated, {s.name: s.label for s in stages}, timings, args)
    (root / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
