"""The evaluation harness's parts against hand computations and independent references:
n-gram tables worked out by hand, the genetic code against Biopython's translate, AUROC against
scikit-learn's, Jensen-Shannon against SciPy's."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from Bio.Seq import Seq

from modelzoo.data.sequences import read_records
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.evaluation import profiles
from modelzoo.evaluation.ngram import CODONS, SMOOTHINGS, START, CodonNGrams
from modelzoo.evaluation.substitutions import (CLASSES, Substitution, auroc, classify, coding_region,
                                               sample_substitutions, snippets)

TOK = CodonTokenizer()
DATA = "tests/data/ypestis_pPCP1_NC_005816.gb"


def ids(text: str) -> np.ndarray:
    return TOK.encode(text).astype(np.int64)


@pytest.fixture(scope="module")
def acacag():
    """One record AAA CCC AAA CCC AAA GGG (A C A C A G), bigrams: start-A 1, A-C 2, C-A 2, A-G 1."""
    return CodonNGrams(2).fit([ids("AAACCCAAACCCAAAGGG")])


def prob(ngrams, smoothing, order, history, codon):
    """P(codon | history) under one model, history as codon strings (oldest first)."""
    symbols = [int(ngrams.compact(ids(c))[0]) for c in history]
    row = [START] * (ngrams.max_order - 1 - len(symbols)) + symbols
    target = int(ngrams.compact(ids(codon))[0])
    return ngrams.next_codon_probabilities(np.array([row]))[smoothing][order - 1, 0, target]


def test_kneser_ney_by_hand(acacag):
    # unigram occurrence counts A 3, C 2, G 1: n1 = 1, n2 = 1, D = 1/3; 6 tokens, 3 types
    assert prob(acacag, "kneser_ney", 1, [], "AAA") == pytest.approx((3 - 1 / 3) / 6 + (1 / 3) * 3 / 6 / 64)
    assert prob(acacag, "kneser_ney", 1, [], "TTT") == pytest.approx((1 / 3) * 3 / 6 / 64)
    # the bigram model's lower order counts continuations: A follows {start, C} (2), C {A} (1),
    # G {A} (1): n1 = 2, n2 = 1, D = 1/2, 4 in all, 3 types
    lower = {"AAA": (2 - 0.5) / 4 + 0.5 * 3 / 4 / 64, "CCC": (1 - 0.5) / 4 + 0.5 * 3 / 4 / 64,
             "GGG": (1 - 0.5) / 4 + 0.5 * 3 / 4 / 64, "TTT": 0.5 * 3 / 4 / 64}
    # bigram occurrence counts 1, 2, 2, 1: n1 = 2, n2 = 2, D = 1/3; after A: C 2, G 1 (3 in all, 2 types)
    d = 1 / 3
    assert prob(acacag, "kneser_ney", 2, ["AAA"], "CCC") == pytest.approx((2 - d) / 3 + d * 2 / 3 * lower["CCC"])
    assert prob(acacag, "kneser_ney", 2, ["AAA"], "GGG") == pytest.approx((1 - d) / 3 + d * 2 / 3 * lower["GGG"])
    assert prob(acacag, "kneser_ney", 2, ["AAA"], "AAA") == pytest.approx(d * 2 / 3 * lower["AAA"])
    assert prob(acacag, "kneser_ney", 2, ["TTT"], "AAA") == pytest.approx(lower["AAA"])  # unseen context backs off


def test_witten_bell_by_hand(acacag):
    unigram = {"AAA": (3 + 3 / 64) / (6 + 3), "CCC": (2 + 3 / 64) / (6 + 3), "TTT": (3 / 64) / (6 + 3)}
    for codon, p in unigram.items():
        assert prob(acacag, "witten_bell", 1, [], codon) == pytest.approx(p)
    assert prob(acacag, "witten_bell", 2, ["AAA"], "CCC") == pytest.approx((2 + 2 * unigram["CCC"]) / (3 + 2))
    assert prob(acacag, "witten_bell", 2, ["CCC"], "AAA") == pytest.approx((2 + 1 * unigram["AAA"]) / (2 + 1))
    assert prob(acacag, "witten_bell", 2, ["CCC"], "TTT") == pytest.approx(unigram["TTT"] / 3)


def reference_probability(records, max_order, order, smoothing, gram):
    """P(gram[-1] | gram[:-1]) computed directly from the definitions with dictionaries: the
    ``order`` model's, ``gram`` holding order - 1 context symbols and the target."""
    counts = Counter()
    for symbols in records:
        padded = [START] * (max_order - 1) + list(symbols)
        for p, w in enumerate(symbols):
            if w < CODONS:
                counts.update(tuple(padded[p + max_order - k: p + max_order]) for k in range(1, max_order + 1))
    continuation = Counter(g[1:] for g in counts if len(g) > 1)

    def discount(table, k, count):
        """Chen & Goodman's discount of a gram seen ``count`` times (modified: its own, plain: D1)."""
        n = [sum(1 for g, c in table.items() if len(g) == k and c == i) for i in range(5)]
        y = n[1] / (n[1] + 2 * n[2]) if n[1] + n[2] else 0.5
        if smoothing == "kneser_ney" or count == 1:
            return min(max(y, 0.1), 1)
        if count == 2:
            return min(max(2 - 3 * y * n[3] / n[2] if n[2] else y, 0.1), 2)
        return min(max(3 - 4 * y * n[4] / n[3] if n[3] else y, 0.1), 3)

    def p(g, top):
        if not g:
            return 1 / CODONS
        table = counts if top or smoothing == "witten_bell" else continuation
        lower = p(g[1:], False)
        same = {x: c for x, c in table.items() if len(x) == len(g) and x[:-1] == g[:-1]}
        total, types = sum(same.values()), len(same)
        if not total:
            return lower
        if smoothing == "witten_bell":
            return (same.get(g, 0) + types * lower) / (total + types)
        c = same.get(g, 0)
        mass = sum(discount(table, len(g), n) for n in same.values())  # each seen target gives up its discount
        return (c - discount(table, len(g), c) if c else 0) / total + mass / total * lower

    return p(tuple(gram[-order:]), True)


def test_every_order_matches_a_direct_computation_from_the_definitions():
    rng = np.random.default_rng(5)
    records = [np.where(rng.random(n) < 0.05, 64, rng.integers(0, 4, n)) for n in (40, 25, 60)]
    as_ids = [np.where(r < CODONS, TOK.codon_ids[np.minimum(r, CODONS - 1)], TOK.unk_id) for r in records]
    ngrams = CodonNGrams(4).fit(as_ids)
    query = np.array([0, 1, 64, 2, 3, 0, 0, 1, 5, 2])  # a start, an [UNK] in contexts, a codon never seen
    logp = ngrams.log_probs(np.where(query < CODONS, TOK.codon_ids[np.minimum(query, CODONS - 1)], TOK.unk_id))
    padded = [START] * 3 + list(query)
    for smoothing in SMOOTHINGS:
        for order in range(1, 5):
            for t, w in enumerate(query):
                if w < CODONS:
                    expected = reference_probability(records, 4, order, smoothing, padded[t: t + 4])
                    assert np.exp(logp[smoothing][order - 1, t]) == pytest.approx(expected, rel=1e-12), \
                        (smoothing, order, t)


def test_every_order_and_smoothing_is_a_distribution_over_the_64_codons():
    records = [ids("ATGAAACCCAAAGGGTTTAAACCCTAA"), ids("ATGCCCNNNAAACCCAAAGGG"), ids("ATGAAAAAACCC")]
    ngrams = CodonNGrams(4).fit(records)
    unk, codon = int(ngrams.compact([TOK.unk_id])[0]), int(ngrams.compact(ids("AAA"))[0])
    history = np.array([[START] * 3, [START, START, 0], [codon, codon, codon], [63, unk, codon], [unk, 5, 7]])
    probabilities = ngrams.next_codon_probabilities(history)
    assert set(probabilities) == set(SMOOTHINGS)
    for smoothing, p in probabilities.items():
        assert p.shape == (4, 5, CODONS) and (p > 0).all(), smoothing
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)


def test_records_stay_apart_and_unk_is_neither_counted_nor_scored():
    ngrams = CodonNGrams(2).fit([ids("AAACCC"), ids("GGGNNNTTT")])
    compact = {c: int(ngrams.compact(ids(c))[0]) for c in ("AAA", "CCC", "GGG", "TTT")}
    bigrams = set(ngrams.raw[1].grams.tolist())
    assert compact["CCC"] * 66 + compact["GGG"] not in bigrams  # no gram from one record into the next
    assert START * 66 + compact["GGG"] in bigrams  # each record starts from the start symbol
    assert len(bigrams) == 4 and ngrams.codons == 4  # AAA, CCC, GGG, TTT targets; [UNK] only as context
    logp = ngrams.log_probs(ids("AAANNNCCC"))
    assert np.isnan(logp["kneser_ney"][:, 1]).all() and np.isfinite(logp["witten_bell"][:, [0, 2]]).all()


def test_sampling_follows_a_deterministic_pattern():
    ngrams = CodonNGrams(3).fit([ids("ATG" + "AAACCCGGG" * 60)])
    rng = np.random.default_rng(0)
    out = ngrams.sample("witten_bell", 3, ids("ATG"), 5, 30, rng)
    assert all(len(x) == 31 and TOK.decode(x[:1]) == "ATG" for x in out)
    follows = {"AAA": "CCC", "CCC": "GGG", "GGG": "AAA"}
    pairs = [(TOK.decode(x[k:k + 1]), TOK.decode(x[k + 1:k + 2])) for x in out for k in range(1, 30)]
    assert sum(follows.get(a) == b for a, b in pairs) / len(pairs) > 0.9


def test_substitution_classes_follow_biopython_translate():
    cds = [r.seq for r in read_records(DATA, features="CDS")]
    rng = np.random.default_rng(1)
    seen = dict.fromkeys(CLASSES, 0)
    for k, seq in enumerate(cds):
        codons = [seq[i:i + 3] for i in range(0, len(seq) - 2, 3)]
        start, end = coding_region(codons)
        subs = sample_substitutions(f"cds{k}", codons, 5, rng)
        for sub in subs:
            assert start < sub.codon_index < end and sub.ref == codons[sub.codon_index]
            assert sum(a != b for a, b in zip(sub.ref, sub.alt)) == 1
            before, after = str(Seq(sub.ref).translate()), str(Seq(sub.alt).translate())
            expected = "nonsense" if after == "*" else "synonymous" if after == before else "missense"
            assert sub.kind == expected, sub
            seen[sub.kind] += 1
        assert max(sum(s.kind == c for s in subs) for c in CLASSES) <= 5
    assert min(seen.values()) >= 5 * len(cds) // 2  # every class is drawn
    for ref in ("ATG", "TGG", "CTT"):  # and every single change of a few codons
        for p in range(3):
            for b in "ACGT":
                alt = ref[:p] + b + ref[p + 1:]
                if alt != ref:
                    t = str(Seq(alt).translate())
                    assert classify(ref, alt) == ("nonsense" if t == "*" else
                                                  "synonymous" if t == str(Seq(ref).translate()) else "missense")


def test_coding_region_is_the_longest_stop_free_run():
    assert coding_region(["ATG", "TAA", "AAA", "CCC", "NNN", "TGA", "GGG"]) == (2, 5)
    assert coding_region(["ATG", "AAA", "TAG"]) == (0, 2)


def test_snippets_cut_the_window_from_the_model_frame():
    codons = [f"{'ACGT'[i % 4]}{'ACGT'[i // 4 % 4]}A" for i in range(40)]
    sub = Substitution("r", 20, codons[20], "TTT", "missense")
    ref, alt, lo, hi = snippets(codons, sub, window=3, context=10, causal=True)
    assert ref == "".join(codons[14:24]) and alt == "".join(codons[14:20] + ["TTT"] + codons[21:24])
    assert (lo, hi) == (3, 10)  # codons 17..23
    ref, alt, lo, hi = snippets(codons, sub, window=3, context=30, causal=False)
    assert ref == "".join(codons[14:27]) and (lo, hi) == (3, 10)  # window plus 3 codons either side
    ref, _, lo, hi = snippets(codons, Substitution("r", 2, codons[2], "TTT", "missense"), 3, 10, causal=True)
    assert ref == "".join(codons[:6]) and (lo, hi) == (0, 6)


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    pos, neg = rng.integers(0, 6, 40).astype(float), rng.integers(-2, 4, 55).astype(float)
    expected = roc_auc_score(np.r_[np.ones(40), np.zeros(55)], np.r_[pos, neg])
    assert auroc(pos, neg) == pytest.approx(expected, abs=1e-12)
    assert auroc([2.0], [1.0, 3.0]) == 0.5 and np.isnan(auroc([], [1.0]))


def test_js_distance_matches_scipy_and_profiles_count_what_they_say():
    from scipy.spatial.distance import jensenshannon

    p, q = np.array([5.0, 0, 3, 2]), np.array([1.0, 4, 0, 5])
    assert profiles.js_distance(p, q) == pytest.approx(jensenshannon(p / p.sum(), q / q.sum(), base=2))
    assert profiles.js_distance(p, 2 * p) == pytest.approx(0.0, abs=1e-7)
    kmers = profiles.kmer_counts("ACGTNAC", 2)  # AC CG GT ..N N.. AC
    assert kmers.sum() == 4 and kmers[0 * 4 + 1] == 2 and kmers[1 * 4 + 2] == 1 and kmers[2 * 4 + 3] == 1
    codon = profiles.codon_counts(ids("AAAAAANNNCCC"), TOK)
    assert codon.sum() == 3 and codon[list(TOK.codon_ids).index(int(ids("AAA")[0]))] == 2
    keys = profiles.codon_kmers(ids("AAACCCGGGAAACCC"), 2, TOK)  # AAA-CCC twice, CCC-GGG, GGG-AAA
    assert len(keys) == 3
    assert profiles.containment(keys, profiles.codon_kmers(ids("AAACCCGGG"), 2, TOK)) == pytest.approx(2 / 3)


def test_knn_and_ari_on_separated_groups():
    vectors = np.array([[1, 0.1], [1, 0.2], [1, 0.15], [0.1, 1], [0.2, 1], [0.6, 0.45]])
    labels = ["a", "a", "a", "b", "b", "b"]
    assert profiles.knn_accuracy(vectors, labels, 1) == pytest.approx(5 / 6)  # the last is nearer the a's
    assert profiles.knn_accuracy(vectors[:5], labels[:5], 1) == 1.0
    assert profiles.cluster_ari(vectors[:5], labels[:5]) == pytest.approx(1.0)
    # k = 2: a tie goes to the label whose votes are more similar (the last row's: to a, wrongly)
    tie = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.7, 0.71]])
    assert profiles.knn_accuracy(tie, ["a", "a", "b", "b"], 2) == pytest.approx(0.75)
