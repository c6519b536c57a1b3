"""Interpolated codon n-grams of every order 1..max_order, fitted in one streaming pass.

Two smoothings, both interpolated (every order mixes in the one below, down to uniform over the
64 codons, so every codon keeps some probability and each context's distribution sums to 1):

- Kneser-Ney, plain interpolated (Chen & Goodman 1998, one absolute discount per order,
  D_k = n1 / (n1 + 2 n2) from the counts of grams seen once and twice, kept within [0.1, 1]):
  P(w | h) = max(c(hw) - D, 0) / c(h) + D N1+(h .) / c(h) P(w | h'), where h' is h without its
  oldest codon; the highest order counts occurrences, the lower orders count continuations
  (how many distinct codons precede h'w).
- Witten-Bell: P(w | h) = (c(hw) + N1+(h .) P(w | h')) / (c(h) + N1+(h .)).

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
SMOOTHINGS = ("kneser_ney", "witten_bell")
_COMPACT_EVERY = 1 << 22  # pending grams per order before they are merged into the counts


@dataclass
class _Level:
    """Counts of the grams of one length k (k - 1 context codons and a target), sorted by key,
    with per-context totals and the number of distinct targets seen after each context."""
    grams: np.ndarray
    counts: np.ndarray
    contexts: np.ndarray
    totals: np.ndarray
    types: np.ndarray
    discount: float

    @classmethod
    def of(cls, grams: np.ndarray, counts: np.ndarray) -> "_Level":
        contexts, first, types = np.unique(grams // BASE, return_index=True, return_counts=True)
        totals = np.add.reduceat(counts, first) if len(first) else np.zeros(0, dtype=np.int64)
        n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
        discount = float(np.clip(n1 / (n1 + 2 * n2), 0.1, 1.0)) if n1 + n2 else 0.5
        return cls(grams, counts, contexts, totals, types, discount)

    def lookup(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """c(hw), c(h) and N1+(h .) of each query gram (zeros where unseen)."""
        return (_find(self.grams, self.counts, query), _find(self.contexts, self.totals, query // BASE),
                _find(self.contexts, self.types, query // BASE))


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
    """Interpolated Kneser-Ney and Witten-Bell codon n-grams of orders 1..max_order.

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
        kn, wb = np.empty((self.max_order, m)), np.empty((self.max_order, m))
        lower_cont = lower_wb = np.full(m, 1.0 / CODONS)
        for k in range(self.max_order):
            c, total, types = self.raw[k].lookup(keys[k])
            kn[k] = _kneser_ney(c, total, types, self.raw[k].discount, lower_cont)
            wb[k] = lower_wb = np.where(total > 0, (c + types * lower_wb) / np.maximum(total + types, 1), lower_wb)
            if k + 1 < self.max_order:
                level = self.continuation[k]
                c, total, types = level.lookup(keys[k])
                lower_cont = _kneser_ney(c, total, types, level.discount, lower_cont)
        return {"kneser_ney": kn, "witten_bell": wb}

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


def _kneser_ney(c, total, types, discount, lower):
    seen = total > 0
    safe = np.maximum(total, 1)
    return np.where(seen, np.maximum(c - discount, 0) / safe + discount * types / safe * lower, lower)
