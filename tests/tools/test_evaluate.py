"""python -m modelzoo.tools.evaluate end to end on a tiny GPT-2 trained a few steps: its figures
against direct computations with GenomeLM and the n-gram, profile and k-NN pieces."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from modelzoo import GenomeLM
from modelzoo.evaluation import profiles
from modelzoo.evaluation.ngram import SMOOTHINGS, CodonNGrams
from modelzoo.tools import evaluate
from tests.helpers import GENOMES
from tests.tools.test_inference_cli import model_dir, records  # noqa: F401 (the tiny trained model and its genomes)
from tests.tools.test_inference_cli import run as run_tool

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: OpenMP wake-ups cost more than the math


def run(capsys, *argv):
    return run_tool(evaluate, capsys, *argv)


def test_every_task_beside_its_baseline(model_dir, records, tmp_path, capsys):
    labels = tmp_path / "labels.tsv"
    labels.write_text("strain\tclade\n" + "".join(f"{r.id}\t{c}\n" for r, c in zip(records, "AAB")))
    out = tmp_path / "eval"
    code, text = run(capsys, "--model_dir", model_dir, "--output_dir", out, "--train_fasta", GENOMES,
                     "--eval_fasta", GENOMES, "--labels", labels, "--label_column", "clade", "--max_order", 4,
                     "--kmer_sizes", "3,5", "--mutations_per_class", 2, "--num_generated", 3,
                     "--generate_codons", 20, "--batch_size", 16)
    assert code == 0, text
    results = json.loads((out / "results.json").read_text())["tasks"]
    lm = GenomeLM.load(model_dir)

    # perplexity: the model's over the codons it scores, the n-grams' over the same codons
    ll, n = lm.log_likelihood(records, batch_size=16, return_counts=True)
    perplexity = results["perplexity"]
    assert perplexity["model"] == pytest.approx(math.exp(-ll.sum() / n.sum()), rel=1e-6)  # float32 logits
    assert perplexity["scored_codons"] == n.sum()
    encoded = [lm.tokenizer.encode(r.seq, lm.reading_frame) for r in records]
    ngrams = CodonNGrams(4).fit(encoded)
    for smoothing in SMOOTHINGS:
        nats = sum(np.nansum(ngrams.log_probs(x)[smoothing][:, 1:], axis=1) for x in encoded)
        np.testing.assert_allclose(perplexity["ngram"][smoothing], np.exp(-nats / n.sum()), rtol=1e-9)
    best = perplexity["best_ngram"]
    assert best["perplexity"] == min(min(v) for v in perplexity["ngram"].values())
    row = perplexity["summary"][0]
    assert row["model_beats_baseline"] == (row["model"] < row["baseline_value"])

    # variants: the model's default embeddings and the profiles, leave-one-out k-NN and ARI
    variants = {r["representation"]: r for r in results["variants"]["representations"]}
    assert len(variants) == 4 and results["variants"]["records"] == 3
    label_list = list("AAB")
    model_row = next(r for name, r in variants.items() if name.startswith("gpt2 embeddings"))
    assert model_row["knn1"] == profiles.knn_accuracy(lm.embed(records, batch_size=16), label_list, 1)
    codon = np.array([profiles.codon_counts(x, lm.tokenizer) for x in encoded])
    assert variants["codon-frequency profile (64-d)"]["knn5"] == profiles.knn_accuracy(codon, label_list, 5)
    five = np.array([profiles.kmer_counts(r.seq, 5) for r in records])
    assert variants["nucleotide 5-mer profile (1024-d)"]["ari"] == pytest.approx(
        profiles.cluster_ari(five, label_list))
    assert (out / "variants_map.png").read_bytes()[:4] == b"\x89PNG"

    # mutation effects: 2 substitutions of each class in each genome, scored by model and n-gram
    mutations = results["mutation_effects"]
    assert mutations["substitutions"] == {"synonymous": 6, "missense": 6, "nonsense": 6}
    for who in ("model", "ngram"):
        assert 0 <= mutations[who]["auroc_nonsense"] <= 1 and 0 <= mutations[who]["auroc_missense"] <= 1
        assert all(math.isfinite(v) for v in mutations[who]["mean_llr"].values())

    # generation: 3 sequences of 20 codons each from the model and the best n-gram
    generation = results["generation"]
    for who in ("model", "ngram", "training"):  # training: 3 stretches of 20 codons from an ATG of GENOMES
        figures = generation[who]
        assert figures["sequences"] == 3 and figures["intact_fraction"] in (0, 1 / 3, 2 / 3, 1)
        assert 0 <= figures["codon_usage_js_distance"] <= 1 and 1 <= figures["open_reading_frame_codons"] <= 20
    for who in ("model", "ngram"):
        figures = generation[who]
        assert 0 <= figures["nearest_training_containment_mean"] <= figures["nearest_training_containment_max"] <= 1

    table = (out / "results.md").read_text()
    assert "| task | metric | model | baseline | baseline value | model beats baseline |" in table
    assert sum(line.startswith("| perplexity |") for line in table.splitlines()) == 1
    assert "beats its baseline on" in text

    code, text = run(capsys, "--model_dir", model_dir, "--output_dir", out, "--tasks", "perplexity",
                     "--train_fasta", GENOMES, "--eval_fasta", GENOMES)
    assert code == 2 and text.count("\n") == 1 and "not empty" in text  # no silent overwrite


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "variants", "--eval_fasta", GENOMES], "task variants needs --labels and --label_column"),
    (["--tasks", "perplexity,typo"], "--tasks 'typo': choose from"),
    (["--tasks", "perplexity", "--train_fasta", "no/such.fasta", "--eval_fasta", GENOMES],
     "no/such.fasta: no such file"),
    (["--tasks", "mutation_effects", "--train_fasta", GENOMES, "--eval_fasta", GENOMES, "--cds_features", "CDS"],
     "features='CDS' needs a GenBank file, this is FASTA"),
    (["--tasks", "perplexity,variants", "--train_fasta", GENOMES, "--eval_fasta", GENOMES, "--labels",
      "tests/data/README.md", "--label_column", "x"], "no column 'x' (label_column)"),
    (["--tasks", "generation", "--train_fasta", GENOMES, "--eval_fasta", GENOMES, "--generate_codons", "1"],
     "--generate_codons 1: must be >= 2"),
    (["--tasks", "perplexity", "--train_fasta", GENOMES, "--eval_fasta", GENOMES, "--max_order", "9"],
     "--max_order 9: at most 8"),
])
def test_bad_settings_are_one_line_before_any_work(model_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "eval"
    code, text = run(capsys, "--model_dir", model_dir, "--output_dir", out, *argv)
    assert code == 2 and text.count("\n") == 1 and message in text, text
    assert not out.exists()


def test_labels_naming_too_few_records_are_refused_before_any_work(model_dir, tmp_path, capsys):
    labels = tmp_path / "labels.tsv"
    labels.write_text("strain\tclade\nWuhan/Hu-1/2019\tA\nsomething/else\tB\n")
    code, text = run(capsys, "--model_dir", model_dir, "--output_dir", tmp_path / "eval", "--tasks", "variants",
                     "--eval_fasta", GENOMES, "--labels", labels, "--label_column", "clade")
    assert code == 2 and text.count("\n") == 1 and "1 records of" in text and "(1 distinct)" in text, text
    assert not (tmp_path / "eval").exists()


def test_mutation_effects_on_the_cds_of_a_genbank_file(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code, text = run(capsys, "--model_dir", model_dir, "--output_dir", out, "--tasks", "mutation_effects",
                     "--train_fasta", GENOMES, "--eval_fasta", GENOMES, "--cds_fasta", "tests/data/NC_045512.2.gb",
                     "--cds_features", "CDS", "--mutations_per_class", 1, "--mutation_records", 4, "--max_order", 3)
    assert code == 0, text
    saved = json.loads((out / "results.json").read_text())
    result = saved["tasks"]["mutation_effects"]
    assert result["records"] == 4 and result["substitutions"] == {"synonymous": 4, "missense": 4, "nonsense": 4}
    assert saved["model"]["precision"] == "float32" and all(  # the tiny model's params: fp32
        math.isfinite(v) for v in result["model"]["mean_llr"].values())


def test_bf16_flag_is_gone_in_one_line(model_dir, tmp_path, capsys):
    code, text = run(capsys, "--model_dir", model_dir, "--output_dir", tmp_path / "eval", "--tasks", "perplexity",
                     "--train_fasta", GENOMES, "--eval_fasta", GENOMES, "--bf16")
    assert code == 2 and text.count("\n") == 1 and "precision its params decide" in text, text
    assert not (tmp_path / "eval").exists()
