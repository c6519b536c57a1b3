"""Interpolated codon n-grams of every order 1..max_order, fitted in one streaming pass.

Three smoothings, all interpolated (every order mixes in the one below, down to uniform over the
64 codons, so every codon keeps some probability and each context's distribution sums to 1):

- Kneser-Ney, modified (Chen & Goodman 1998): P(w | h) = (c(hw) - D(c(hw))) / c(h)
  + (D1 N1(h .) + D2 N2(h .) + D3 N3+(h .)) / c(h) P(w | h'), where h' is h without its oldest
  codon, Ni(h .) counts the codons seen i times after h (N3+: 3 or more), D(0) = 0 and
  D1 = Y, D2 = 2 - 3Y n3/n2, D3 = 3 - 4Y n4/n3 with Y = n1 / (n1 + 2 n2), ni being the number of
  grams of that order seen i times (each D kept within [0.1, i]). The highest order counts
  occurrences; the lower orders count continuations (how many distinct codons precede h'w).
- Kneser-Ney, plain: the same with one discount D = Y (kept within [0.1, 1]) for every count.
- Witten-Bell: P(w | h) = (c(hw) + N1+(h .) P(w | h')) / (c(h) + N1+(h .)), occurrences at
  every order.

A context never seen backs off to the order below. Each record is its own sequence: its context
starts with max_order - 1 start symbols, and no gram crosses from one record into the next.
[UNK] codons (N or another ambiguity code) are never predicted nor counted as targets, but they
stand in contexts as a symbol of their own, as the model sees them.

Token ids are the CodonTokenizer's; internally codon k is the k-th of ``tokenizer.codon_ids``
(0..63), [UNK] is 64 and the start symbol 65, so a gram of up to 8 symbols is one int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from modelzoo.data.tokenizer import CodonTokenizer

CODONS = 64
UNK = 64  # compact symbol of [UNK] (and any other non-codon token)
START = 65  # compact symbol before a record's first codon
BASE = 66
MAX_ORDER = 8
SMOOTHINGS = ("kneser_ney_modified", "kneser_ney", "witten_bell")
_COMPACT_EVERY = 1 << 22  # pending grams per order before they are merged into the counts


@dataclass
class _Level:
    """Counts of the grams of one length k (k - 1 context codons and a target), sorted by key,
    with, per context, the total count and how many distinct targets follow it once, twice and
    three or more times; and the Kneser-Ney discounts these counts give."""
    grams: np.ndarray
    counts: np.ndarray
    contexts: np.ndarray
    totals: np.ndarray
    followers: np.ndarray  # (3, contexts): targets seen once, twice, three or more times
    discount: float  # plain Kneser-Ney: one discount
    discounts: np.ndarray  # modified Kneser-Ney: the discounts of counts 1, 2 and 3+

    @classmethod
    def of(cls, grams: np.ndarray, counts: np.ndarray) -> "_Level":
        contexts, first = np.unique(grams // BASE, return_index=True)  # grams sorted: contexts contiguous

        def per_context(values):
            return np.add.reduceat(values, first) if len(first) else np.zeros(0, dtype=np.int64)

        followers = np.stack([per_context(f.astype(np.int64)) for f in (counts == 1, counts == 2, counts >= 3)])
        n1, n2, n3, n4 = (int((counts == i).sum()) for i in (1, 2, 3, 4))
        y = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
        modified = [y, 2 - 3 * y * n3 / n2 if n2 else y, 3 - 4 * y * n4 / n3 if n3 else y]  # Chen & Goodman
        discounts = np.array([min(max(d, 0.1), i) for i, d in enumerate(modified, start=1)])
        return cls(grams, counts, contexts, per_context(counts), followers, float(discounts[0]), discounts)

    def lookup(self, query: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per query gram: its count c(hw), its context's total c(h), and the numbers of codons
        seen once, twice, three or more times after the context (all 0 for an unseen context)."""
        if not len(self.contexts):
            return (np.zeros(len(query), dtype=np.int64),) * 5
        at = np.minimum(np.searchsorted(self.contexts, query // BASE), len(self.contexts) - 1)
        seen = self.contexts[at] == query // BASE
        return (_find(self.grams, self.counts, query), np.where(seen, self.totals[at], 0),
                *(np.where(seen, f[at], 0) for f in self.followers))

    def interpolate(self, found: tuple[np.ndarray, ...], lower: np.ndarray, smoothing: str) -> np.ndarray:
        """P(target | context) of query grams (their ``lookup``) under one smoothing, given the
        probabilities ``lower`` of the same targets one order below; an unseen context gives ``lower``."""
        c, total, once, twice, more = found
        safe = np.maximum(total, 1)
        if smoothing == "witten_bell":
            types = once + twice + more
            p = (c + types * lower) / np.maximum(total + types, 1)
        elif smoothing == "kneser_ney":
            p = np.maximum(c - self.discount, 0) / safe + self.discount * (once + twice + more) / safe * lower
        else:  # kneser_ney_modified
            d1, d2, d3 = self.discounts
            d = np.select([c == 0, c == 1, c == 2], [0.0, d1, d2], d3)
            p = (c - d) / safe + (d1 * once + d2 * twice + d3 * more) / safe * lower
        return np.where(total > 0, p, lower)


def _find(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    if not len(keys):
        return np.zeros(len(query), dtype=np.int64)
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[at] == query, values[at], 0)


def _merge(keys: np.ndarray, counts: np.ndarray, pending: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    new = np.concatenate(pending)
    keys, inverse = np.unique(np.concatenate((keys, new)), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate((counts, np.ones(len(new)))), minlength=len(keys))
    return keys, counts.astype(np.int64)


class CodonNGrams:
    """Interpolated modified Kneser-Ney, plain Kneser-Ney and Witten-Bell codon n-grams of orders 1..max_order.

        ngrams = CodonNGrams().fit(tokenizer.encode(seq, frame) for seq in training_sequences)
        logp = ngrams.log_probs(ids)      # {smoothing: (max_order, len(ids)) natural logs}
    """

    def __init__(self, max_order: int = MAX_ORDER, tokenizer: CodonTokenizer | None = None):
        if not 1 <= max_order <= MAX_ORDER:
            raise ValueError(f"max_order {max_order}: must be in 1..{MAX_ORDER}")
        self.max_order = max_order
        self.tokenizer = tokenizer or CodonTokenizer()
        self._compact = np.full(self.tokenizer.vocab_size, UNK, dtype=np.int64)
        self._compact[self.tokenizer.codon_ids] = np.arange(CODONS)
        self._keys = [np.zeros(0, dtype=np.int64) for _ in range(max_order)]
        self._counts = [np.zeros(0, dtype=np.int64) for _ in range(max_order)]
        self._pending: list[list[np.ndarray]] = [[] for _ in range(max_order)]
        self._pending_size = 0
        self.records = self.codons = 0
        self.raw: list[_Level] = []  # per order k - 1: occurrence counts
        self.continuation: list[_Level] = []  # per order k - 1 (k < max_order): continuation counts

    # ------------------------------------------------------------------ fitting

    def compact(self, ids: np.ndarray) -> np.ndarray:
        """Token ids -> compact symbols (codons 0..63, anything else UNK)."""
        return self._compact[np.asarray(ids, dtype=np.int64)]

    def grams(self, symbols: np.ndarray) -> list[np.ndarray]:
        """The gram key of every position of one record, per order: keys[k - 1][p] holds the
        target symbols[p] and its k - 1 predecessors (start symbols before the record)."""
        padded = np.concatenate((np.full(self.max_order - 1, START, dtype=np.int64), symbols))
        keys, key = [], symbols.copy()
        for k in range(1, self.max_order + 1):
            if k > 1:
                key = key + padded[self.max_order - k: self.max_order - k + len(symbols)] * BASE ** (k - 1)
            keys.append(key)
        return keys

    def add(self, ids: np.ndarray) -> None:
        """Count one record's grams (every codon target, including the first codon's)."""
        symbols = self.compact(ids)
        targets = symbols < CODONS
        for pending, keys in zip(self._pending, self.grams(symbols)):
            pending.append(keys[targets])
        self.records += 1
        self.codons += int(targets.sum())
        self._pending_size += int(targets.sum())
        if self._pending_size >= _COMPACT_EVERY:
            self._flush()

    def _flush(self) -> None:
        for k, pending in enumerate(self._pending):
            if pending:
                self._keys[k], self._counts[k] = _merge(self._keys[k], self._counts[k], pending)
            pending.clear()
        self._pending_size = 0

    def fit(self, records: Iterable[np.ndarray]) -> "CodonNGrams":
        """Count every record (token ids each) and derive the smoothing statistics."""
        for ids in records:
            self.add(ids)
        return self.finish()

    def finish(self) -> "CodonNGrams":
        self._flush()
        self.raw = [_Level.of(g, c) for g, c in zip(self._keys, self._counts)]
        self.continuation = []
        for k in range(1, self.max_order):  # order k from the distinct grams of order k + 1 ending in it
            suffixes, counts = np.unique(self._keys[k] % BASE ** k, return_counts=True)
            self.continuation.append(_Level.of(suffixes, counts))
        return self

    # ------------------------------------------------------------------ probabilities

    def probabilities(self, keys: list[np.ndarray]) -> dict[str, np.ndarray]:
        """P(target | context) of query grams (``grams``' layout: one key array per order, whose
        targets are codons) under each smoothing: {smoothing: (max_order, m)}, row k - 1 the
        model of order k."""
        m = len(keys[0])
        out = {smoothing: np.empty((self.max_order, m)) for smoothing in SMOOTHINGS}
        lower = {smoothing: np.full(m, 1.0 / CODONS) for smoothing in SMOOTHINGS}  # below order 1: uniform
        for k in range(self.max_order):
            raw = self.raw[k].lookup(keys[k])
            continuation = self.continuation[k].lookup(keys[k]) if k + 1 < self.max_order else None
            for smoothing, p in out.items():
                p[k] = self.raw[k].interpolate(raw, lower[smoothing], smoothing)
                if smoothing == "witten_bell":
                    lower[smoothing] = p[k]
                elif continuation is not None:  # Kneser-Ney's lower orders count continuations
                    lower[smoothing] = self.continuation[k].interpolate(continuation, lower[smoothing], smoothing)
        return out

    def log_probs(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Natural-log probability of each codon of one record given the codons before it in the
        record: {smoothing: (max_order, len(ids))}, NaN where the token is not a codon."""
        symbols = self.compact(ids)
        targets = symbols < CODONS
        keys = [k[targets] for k in self.grams(symbols)]
        out = {}
        for name, p in self.probabilities(keys).items():
            values = np.full((self.max_order, len(symbols)), np.nan)
            values[:, targets] = np.log(p)
            out[name] = values
        return out

    def next_codon_probabilities(self, history: np.ndarray) -> dict[str, np.ndarray]:
        """The distribution of the next codon after each row of ``history`` (rows of the last
        max_order - 1 compact symbols, oldest first; START where there is none): {smoothing:
        (max_order, rows, 64)}."""
        history = np.asarray(history, dtype=np.int64).reshape(len(history), self.max_order - 1)
        rows = len(history)
        targets = np.tile(np.arange(CODONS), rows)
        keys, key = [], targets.copy()
        for k in range(1, self.max_order + 1):
            if k > 1:
                key = key + np.repeat(history[:, self.max_order - k], CODONS) * BASE ** (k - 1)
            keys.append(key)
        return {name: p.reshape(self.max_order, rows, CODONS) for name, p in self.probabilities(keys).items()}

    def sample(self, smoothing: str, order: int, prompt_ids: np.ndarray, num_sequences: int, codons: int,
               rng: np.random.Generator) -> list[np.ndarray]:
        """``num_sequences`` token-id arrays: the prompt then ``codons`` codons sampled from the
        model of this smoothing and order, each given the prompt and the codons sampled before."""
        history = np.full((num_sequences, self.max_order - 1 + len(prompt_ids) + codons), START, dtype=np.int64)
        at = self.max_order - 1
        history[:, at: at + len(prompt_ids)] = self.compact(prompt_ids)
        for t in range(at + len(prompt_ids), history.shape[1]):
            p = self.next_codon_probabilities(history[:, t - self.max_order + 1: t])[smoothing][order - 1]
            cumulative = np.cumsum(p, axis=1)
            draws = rng.random(num_sequences) * cumulative[:, -1]
            history[:, t] = np.minimum((cumulative < draws[:, None]).sum(1), CODONS - 1)
        return [self.tokenizer.codon_ids[row[at:]].astype(np.int64) for row in history]
