"""Point substitutions in coding sequences, classed by the standard genetic code, and AUROC.

A record's coding region is its longest run of codons without a stop codon (TAA/TAG/TGA) in the
frame the model reads: a CDS's whole length but its stop, a SARS-CoV-2 genome's ORF1ab when the
model reads ORF1ab's frame. Substitutions change one nucleotide of one whole A/C/G/T codon of
that region, never its first codon (the start codon, and under a causal model the first codon
of a record is not scored). Each possible substitution is one of

- synonymous: the codon still codes for the same amino acid;
- missense: it codes for another amino acid;
- nonsense: it became a stop codon (stop gained).

``sample_substitutions`` draws, per record and class, up to ``per_class`` of them at random
without replacement (seeded), so that the rare nonsense class is measured too.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

BASES = "TCAG"
# NCBI translation table 1 (the standard code), codons in TCAG order: TTT TTC TTA TTG TCT ...
STANDARD_CODE = dict(zip(("".join(c) for c in product(BASES, repeat=3)),
                         "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"))
CLASSES = ("synonymous", "missense", "nonsense")


@dataclass(frozen=True)
class Substitution:
    record: str
    codon_index: int  # 0-based, in the model's reading frame
    ref: str
    alt: str
    kind: str  # one of CLASSES


def classify(ref: str, alt: str) -> str:
    """The class of changing sense codon ``ref`` into ``alt`` (both A/C/G/T)."""
    before, after = STANDARD_CODE[ref], STANDARD_CODE[alt]
    if before == "*":
        raise ValueError(f"{ref} is a stop codon, not a sense codon")
    return "nonsense" if after == "*" else "synonymous" if after == before else "missense"


def coding_region(codons: list[str]) -> tuple[int, int]:
    """[start, end) of the longest run of codons without a stop codon (the first such run on ties)."""
    best, start = (0, 0), 0
    for i, codon in enumerate(codons + ["TAA"]):
        if STANDARD_CODE.get(codon) == "*":
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = i + 1
    return best


def _single_changes(codon: str) -> list[str]:
    return [codon[:p] + b + codon[p + 1:] for p in range(3) for b in BASES if b != codon[p]]


def sample_substitutions(record: str, codons: list[str], per_class: int, rng: np.random.Generator
                         ) -> list[Substitution]:
    """Up to ``per_class`` random substitutions of each class in the record's coding region,
    ordered by codon index."""
    start, end = coding_region(codons)
    candidates: dict[str, list[tuple[int, str]]] = {kind: [] for kind in CLASSES}
    for i in range(max(start + 1, 1), end):
        ref = codons[i]
        if ref in STANDARD_CODE:
            for alt in _single_changes(ref):
                candidates[classify(ref, alt)].append((i, alt))
    chosen = []
    for kind in CLASSES:
        pool = candidates[kind]
        for k in sorted(rng.choice(len(pool), size=min(per_class, len(pool)), replace=False).tolist()):
            i, alt = pool[k]
            chosen.append(Substitution(record, i, codons[i], alt, kind))
    return sorted(chosen, key=lambda s: (s.codon_index, s.alt))


def snippets(codons: list[str], sub: Substitution, window: int, context: int, causal: bool
             ) -> tuple[str, str, int, int]:
    """The stretch of the record a substitution is scored on, with the reference codon and with
    the alternative (nucleotides from the model's frame), and [lo, hi): the codons of the LLR
    window within it (the substituted one and up to ``window`` either side). The stretch fits
    the model's context: for a causal model it ends ``window`` codons after the substituted one
    and reaches back as far as the context allows; for a masked model (whose every codon is
    scored once per codon) it adds ``window`` codons of context either side of the window."""
    i = sub.codon_index
    if codons[i] != sub.ref:
        raise ValueError(f"{sub.record}: codon {i} is {codons[i]}, not {sub.ref}")
    if causal:
        end = min(len(codons), i + window + 1)
        start = max(0, end - context)
    else:
        start = max(0, i - 2 * window, i - context // 2)
        end = min(len(codons), i + 2 * window + 1, start + context)
    ref = codons[start:end]
    alt = ref[: i - start] + [sub.alt] + ref[i - start + 1:]
    return "".join(ref), "".join(alt), max(i - window, start) - start, min(i + window + 1, end) - start


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Area under the ROC curve of scores where ``positives`` should score higher: the chance
    that a random positive outscores a random negative, ties counting one half (Mann-Whitney)."""
    from scipy.stats import rankdata

    positives, negatives = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    if not len(positives) or not len(negatives):
        return float("nan")
    ranks = rankdata(np.concatenate((positives, negatives)))
    n = len(positives)
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * len(negatives)))
