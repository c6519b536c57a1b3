"""The codon count models the eval line reports beside the model's perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.training.baselines import CodonNGram

TOK = CodonTokenizer()
A, C, G = (int(TOK.encode(c)[0]) for c in ("AAA", "CCC", "GGG"))


def test_unigram_counts_codon_targets_only():
    windows = [np.array([A, A, C, TOK.unk_id, TOK.pad_id, TOK.pad_id])]
    model = CodonNGram(1, windows, k=1.0)
    # targets: A, C (the first token is never a target; [UNK] and [PAD] are not counted)
    nats, scored = model.log_likelihood(np.array([G, A, C, TOK.unk_id]))
    assert scored == 2
    assert nats == pytest.approx(math.log(2 / 66) * 2)


def test_trigram_learns_a_repeating_pattern_and_smoothing_is_chosen():
    pattern = np.array([A, C, G] * 40)
    model = CodonNGram(3, [pattern]).fit_smoothing([pattern])
    assert model.k == min((1.0, 0.1, 0.01, 0.001, 1e-4))
    assert model.perplexity([pattern]) < 1.01
    assert CodonNGram(1, [pattern]).fit_smoothing([pattern]).perplexity([pattern]) == pytest.approx(3, rel=0.01)


def test_eval_line_reports_unigram_and_trigram(shards_msl64, tmp_path, capsys):
    from modelzoo.cli import main
    from tests.helpers import tiny_params, write_params
    params = write_params(tmp_path / "p.yaml", tiny_params(shards_msl64, tmp_path / "md", max_steps=1))
    assert main(["CPU", "--params", str(params), "--mode", "train_and_eval"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "eval at step" in x][-1]
    unigram, trigram = (float(x) for x in line.split("count-model perplexity ")[1].split(" / "))
    assert 1 < unigram < 64 * 1.2 and 1 < trigram  # two training genomes: the trigram may not beat it here
