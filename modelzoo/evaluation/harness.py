"""What the harness's tasks share: the settings and their checks, the table row, and the run
(the model with the count baselines fitted once on the training FASTA, and the best of them)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from modelzoo.data.datasets import read_label_table
from modelzoo.data.sequences import read_record_batches, read_records
from modelzoo.errors import ConfigError, DataError
from modelzoo.evaluation import profiles
from modelzoo.evaluation.ngram import MAX_ORDER, SMOOTHINGS, CodonNGrams
from modelzoo.inference import GenomeLM

TASKS = ("perplexity", "variants", "mutation_effects", "generation")
SMOOTHING_NAMES = {"kneser_ney_modified": "modified Kneser-Ney", "kneser_ney": "Kneser-Ney",
                   "witten_bell": "Witten-Bell"}


@dataclass
class Row:
    """One line of the results table: a figure of the model beside its baseline's."""
    metric: str
    model: float
    baseline: str
    baseline_value: float
    better: str | None  # "higher", "lower", or None (a figure with no better direction)

    @property
    def model_beats_baseline(self) -> bool | None:
        if self.better is None or not (math.isfinite(self.model) and math.isfinite(self.baseline_value)):
            return None
        return self.model > self.baseline_value if self.better == "higher" else self.model < self.baseline_value

    def as_dict(self) -> dict:
        return {**asdict(self), "model_beats_baseline": self.model_beats_baseline}


@dataclass
class Settings:
    train_fasta: str | None = None
    eval_fasta: str | None = None
    cds_fasta: str | None = None  # mutation_effects' records (default: eval_fasta)
    cds_features: str | None = None  # read this GenBank feature type of cds_fasta (e.g. CDS), not whole records
    labels: str | None = None
    label_column: str | None = None
    id_column: str | None = None
    skip_labels: tuple[str, ...] = ()
    kmer_sizes: tuple[int, ...] = (4, 5, 6, 7)
    max_order: int = MAX_ORDER
    mutations_per_class: int = 4
    mutation_records: int | None = None
    llr_window: int = 16
    num_generated: int = 32
    generate_codons: int = 300
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 8
    draw_map: bool = True
    output: Path | None = None  # where the task's pictures go


NEEDS = {"perplexity": ("train_fasta", "eval_fasta"), "variants": ("eval_fasta", "labels", "label_column"),
         "mutation_effects": ("train_fasta", "eval_fasta"), "generation": ("train_fasta", "eval_fasta")}


def check_settings(tasks: list[str], s: Settings) -> None:
    """Refuse, before any work, a task that lacks an input or a setting out of range."""
    for task in tasks:
        if task not in TASKS:
            raise ConfigError(f"--tasks {task!r}: choose from {', '.join(TASKS)}")
    for task in tasks:
        missing = [f"--{name}" for name in NEEDS[task] if getattr(s, name) is None]
        if missing:
            raise ConfigError(f"task {task} needs {' and '.join(missing)}")
    for name, value, low in (("max_order", s.max_order, 1), ("mutations_per_class", s.mutations_per_class, 1),
                             ("llr_window", s.llr_window, 0), ("num_generated", s.num_generated, 1),
                             ("generate_codons", s.generate_codons, 2), ("batch_size", s.batch_size, 1)):
        if value < low:
            raise ConfigError(f"--{name} {value}: must be >= {low}")
    if s.max_order > MAX_ORDER:
        raise ConfigError(f"--max_order {s.max_order}: at most {MAX_ORDER}")
    if any(k < 1 or k > 8 for k in s.kmer_sizes) or not s.kmer_sizes:
        raise ConfigError(f"--kmer_sizes {','.join(map(str, s.kmer_sizes))}: give sizes in 1..8")


def check_inputs(tasks: list[str], s: Settings) -> None:
    """Refuse, before any model work, an input file that is missing or neither FASTA nor
    GenBank (each is opened and sniffed, not read), and a label table naming too few records."""
    for name in {name for task in tasks for name in NEEDS[task] if name.endswith("_fasta")}:
        read_records(getattr(s, name))
    if "mutation_effects" in tasks:
        read_records(s.cds_fasta or s.eval_fasta, features=s.cds_features)
    if "variants" in tasks:
        label_table(s)


@dataclass
class EvalRun:
    """The model, the settings, and what several tasks share: the codon n-grams fitted on the
    training FASTA, the training codon usage, and the n-gram (smoothing, order) with the lowest
    perplexity on the evaluation FASTA."""
    lm: GenomeLM
    settings: Settings
    _ngrams: CodonNGrams | None = None
    train_codon_counts: np.ndarray | None = None
    ngram_perplexity: dict | None = None  # {smoothing: [perplexity of order 1..max_order]}
    best: tuple[str, int] | None = None
    notes: list[str] = field(default_factory=list)

    def encode(self, seq) -> np.ndarray:
        return self.lm.tokenizer.encode(seq, self.lm.reading_frame).astype(np.int64)

    @property
    def ngrams(self) -> CodonNGrams:
        if self._ngrams is None:
            ngrams = CodonNGrams(self.settings.max_order, self.lm.tokenizer)
            counts = np.zeros(64)
            for rec in tqdm(records_of(self.settings.train_fasta), desc="n-gram counts", unit=" records"):
                ids = self.encode(rec.seq)
                ngrams.add(ids)
                counts += profiles.codon_counts(ids, self.lm.tokenizer)
            if not ngrams.codons:
                raise DataError(f"--train_fasta {self.settings.train_fasta}: no whole A/C/G/T codon to count")
            self._ngrams, self.train_codon_counts = ngrams.finish(), counts
        return self._ngrams

    def best_ngram(self) -> tuple[str, int]:
        """(smoothing, order) of the n-gram with the lowest perplexity on the evaluation FASTA,
        over the codons the model scores (the perplexity task's; else by the model's rule)."""
        if self.best is None:
            sums = NGramSums(self.ngrams)
            for rec in tqdm(records_of(self.settings.eval_fasta), desc="n-gram scores", unit=" records"):
                ids = self.encode(rec.seq)
                sums.add(ids, scored_by_rule(ids, self.lm))
            self.set_ngram_perplexity(sums)
        return self.best

    def set_ngram_perplexity(self, sums: "NGramSums") -> None:
        self.ngram_perplexity = sums.perplexities()
        self.best = min(((s, k + 1) for s in SMOOTHINGS for k in range(self.settings.max_order)),
                        key=lambda b: (self.ngram_perplexity[b[0]][b[1] - 1], b[1]))

    def best_name(self) -> str:
        smoothing, order = self.best_ngram()
        return f"codon {order}-gram ({SMOOTHING_NAMES[smoothing]})"


def records_of(path, features: str | None = None):
    """A file's records (or a GenBank file's ``features``); a repeated id (NCBI CDS files have
    them) gets #2, #3...: only the variants task, which looks labels up by id, insists on unique ids."""
    return read_records(path, features=features, rename_duplicates=True)


def scored_by_rule(ids: np.ndarray, lm: GenomeLM) -> np.ndarray:
    """The codons GenomeLM scores: every codon (not [UNK]), but a causal model's first."""
    scored = np.isin(ids, lm.tokenizer.codon_ids)
    if lm.is_causal and len(scored):
        scored[0] = False
    return scored


class NGramSums:
    """Summed n-gram log-probabilities of chosen codons, per smoothing and order."""

    def __init__(self, ngrams: CodonNGrams):
        self.ngrams = ngrams
        self.nats = {s: np.zeros(ngrams.max_order) for s in SMOOTHINGS}
        self.codons = 0

    def add(self, ids: np.ndarray, scored: np.ndarray) -> dict[str, np.ndarray]:
        """Add one record's codons where ``scored``; returns the record's own sums."""
        logp = self.ngrams.log_probs(ids)
        own = {s: logp[s][:, scored].sum(1) for s in SMOOTHINGS}
        for s in SMOOTHINGS:
            self.nats[s] += own[s]
        self.codons += int(scored.sum())
        return own

    def perplexities(self) -> dict[str, list[float]]:
        if not self.codons:
            raise DataError("the evaluation FASTA has no codon to score")
        return {s: np.exp(-self.nats[s] / self.codons).tolist() for s in SMOOTHINGS}


def label_table(s: Settings) -> dict[str, str]:
    """The label of each --eval_fasta record id that has one (not in --skip_labels), once the
    file is known to hold 3 or more such records with 2 or more labels (ids read, not sequences)."""
    table, _ = read_label_table(s.labels, s.label_column, s.id_column)
    skip = set(s.skip_labels)
    table = {rid: label for rid, label in table.items() if label not in skip}
    labels = [table[rid] for batch in read_record_batches(s.eval_fasta) for rid in batch.ids if rid in table]
    if len(labels) < 3 or len(set(labels)) < 2:
        raise DataError(f"{s.labels}: {len(labels)} records of {s.eval_fasta} carry a {s.label_column} "
                        f"({len(set(labels))} distinct); need 3 or more with 2 or more labels (check --id_column)")
    return table
