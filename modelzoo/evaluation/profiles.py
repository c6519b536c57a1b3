"""Alignment-free profiles of genomes and the measures the harness compares them with.

- ``codon_counts`` / ``kmer_counts``: a genome as its 64 codon counts (in the model's frame,
  [UNK] left out) or its 4^k nucleotide k-mer counts (k-mers holding N or another code left out);
- ``knn_accuracy``: leave-one-out k-nearest-neighbour accuracy of a label, cosine similarity;
- ``cluster_ari``: adjusted Rand index of k-means clusters (as many as labels) against the label;
- ``js_distance``: Jensen-Shannon distance of two distributions (base 2: 0 same, 1 disjoint);
- ``containment``: the fraction of a sequence's codon k-mers found in another sequence.

Every vector is compared by direction (cosine; k-means on unit vectors), so a profile's counts
and its frequencies give the same figures.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from modelzoo.data.tokenizer import CodonTokenizer

RANDOM_STATE = 0
_NUCLEOTIDE = np.full(256, 4, dtype=np.int64)
for _code, _base in enumerate(b"ACGT"):
    _NUCLEOTIDE[_base] = _NUCLEOTIDE[_base + 32] = _code
_NUCLEOTIDE[ord("U")] = _NUCLEOTIDE[ord("u")] = 3


def codon_counts(ids: np.ndarray, tokenizer: CodonTokenizer) -> np.ndarray:
    """How often each of the 64 codons (in ``tokenizer.codon_ids`` order) occurs in token ids."""
    counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=tokenizer.vocab_size)
    return counts[tokenizer.codon_ids].astype(np.float64)


def kmer_counts(seq: str | bytes, k: int) -> np.ndarray:
    """How often each nucleotide k-mer (index: base-4 number, A=0 C=1 G=2 T/U=3) occurs, over
    every position (both frames alike); k-mers holding any other character are skipped."""
    raw = seq.encode("latin-1") if isinstance(seq, str) else seq
    bases = _NUCLEOTIDE[np.frombuffer(raw, dtype=np.uint8)]
    if len(bases) < k:
        return np.zeros(4 ** k)
    windows = np.lib.stride_tricks.sliding_window_view(bases, k)
    whole = windows[(windows < 4).all(1)]
    return np.bincount(whole @ (4 ** np.arange(k - 1, -1, -1)), minlength=4 ** k).astype(np.float64)


def _unit(vectors: np.ndarray) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def knn_accuracy(vectors: np.ndarray, labels: Sequence[str], k: int) -> float:
    """Leave-one-out k-NN accuracy: each row's label predicted by the majority of its k most
    cosine-similar other rows (k at most rows - 1); a tie goes to the tied label whose votes sum
    the higher similarity."""
    x = _unit(vectors)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, len(x) - 1)
    correct = 0
    for i in range(len(x)):
        nearest = np.argsort(-sim[i], kind="stable")[:k]
        votes, weight = Counter(), Counter()
        for j in nearest:
            votes[labels[j]] += 1
            weight[labels[j]] += sim[i, j]
        correct += max(votes, key=lambda label: (votes[label], weight[label])) == labels[i]
    return correct / len(x)


def cluster_ari(vectors: np.ndarray, labels: Sequence[str], random_state: int = RANDOM_STATE) -> float:
    """Adjusted Rand index of k-means (k = number of labels, 10 starts) on the unit vectors."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    clusters = KMeans(n_clusters=len(set(labels)), n_init=10, random_state=random_state).fit_predict(_unit(vectors))
    return float(adjusted_rand_score(list(labels), clusters))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2, of two count or frequency vectors (normalised here)."""
    p = np.asarray(p, dtype=np.float64) / np.sum(p)
    q = np.asarray(q, dtype=np.float64) / np.sum(q)
    m = (p + q) / 2

    def kl(a):
        nonzero = a > 0
        return float(np.sum(a[nonzero] * np.log2(a[nonzero] / m[nonzero])))

    return float(np.sqrt(max((kl(p) + kl(q)) / 2, 0.0)))


def codon_kmers(ids: np.ndarray, k: int, tokenizer: CodonTokenizer) -> np.ndarray:
    """The distinct runs of k consecutive codons (no [UNK]) of token ids, as sorted int64 keys."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < k:
        return np.zeros(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, k)
    whole = windows[np.isin(windows, tokenizer.codon_ids).all(1)]
    return np.unique(whole @ (tokenizer.vocab_size ** np.arange(k - 1, -1, -1)))


def containment(query: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of the ``query`` k-mer keys found among the ``reference`` keys (both ``codon_kmers``)."""
    return float(np.isin(query, reference, assume_unique=True).mean()) if len(query) else 0.0
