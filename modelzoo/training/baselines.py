"""Codon n-gram count models: the floors a language model must beat, computed on the same
windows and targets as the causal loss (every codon of a window but the first; [UNK], [PAD] and
other special tokens are neither counted nor scored)."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from modelzoo.data.tokenizer import CodonTokenizer

SMOOTHING = (1.0, 0.1, 0.01, 0.001, 1e-4)  # add-k candidates


class CodonNGram:
    """Codon n-gram counts with add-k smoothing over the 64 codons. A context that starts before
    the window is padded with a start symbol, as the model sees no codon before its window."""

    def __init__(self, n: int, windows: Iterable[np.ndarray], k: float = 0.01,
                 tokenizer: CodonTokenizer | None = None):
        tok = tokenizer or CodonTokenizer()
        self.n, self.k = n, k
        self.codons = tok.codon_ids
        self.start = tok.vocab_size
        self.base = tok.vocab_size + 1  # token ids plus the start symbol
        grams = [g[np.isin(t, self.codons)] for g, t in map(self._grams, windows)]
        grams = np.concatenate(grams) if grams else np.zeros(0, dtype=np.int64)
        # sparse counts (sorted keys + counts): a dense table of 70^n entries is too big past n = 3
        self.grams, self.gram_counts = np.unique(grams, return_counts=True)
        self.contexts, self.context_totals = np.unique(grams // self.base, return_counts=True)

    @staticmethod
    def _lookup(keys: np.ndarray, counts: np.ndarray, query: np.ndarray) -> np.ndarray:
        if not len(keys):
            return np.zeros(len(query), dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        return np.where(keys[at] == query, counts[at], 0)

    def count(self, index: np.ndarray) -> np.ndarray:
        return self._lookup(self.grams, self.gram_counts, index)

    def _grams(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(gram index, target) for every token but the first (which the model does not score either)."""
        ids = np.asarray(ids, dtype=np.int64)
        padded = np.concatenate([np.full(self.n - 1, self.start), ids])
        index = np.zeros(len(ids), dtype=np.int64)
        for j in range(self.n):  # oldest context codon first: index = sum ids[t - n + 1 + j] * base^(n-1-j)
            index = index * self.base + padded[j: j + len(ids)]
        return index[1:], ids[1:]

    def log_likelihood(self, ids: np.ndarray) -> tuple[float, int]:
        """Total natural-log probability of the window's scored codons, and how many."""
        index, targets = self._grams(ids)
        index = index[np.isin(targets, self.codons)]
        context = self._lookup(self.contexts, self.context_totals, index // self.base)
        p = (self.count(index) + self.k) / (context + len(self.codons) * self.k)
        return float(np.log(p).sum()), len(index)

    def perplexity(self, windows: Iterable[np.ndarray]) -> float:
        total = scored = 0
        for window in windows:
            nats, n = self.log_likelihood(window)
            total, scored = total + nats, scored + n
        return math.exp(-total / max(scored, 1))

    def fit_smoothing(self, windows: list[np.ndarray]) -> "CodonNGram":
        """Choose add-k by perplexity on ``windows``."""
        scores = {}
        for k in SMOOTHING:
            self.k = k
            scores[k] = self.perplexity(windows)
        self.k = min(scores, key=scores.get)
        return self
