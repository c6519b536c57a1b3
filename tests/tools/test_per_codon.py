"""Per-codon log-probabilities: GenomeLM.codon_log_probs, score --per_codon and the mutations tool.

The per-codon values are log_likelihood's, codon by codon (their sum is its total), each at the
index of the codon it scores; a point mutation planted in a genome the model knows is among its
least likely codons, and the mutations tool lists it against the reference.
"""

import math

import numpy as np
import pytest
import torch
import yaml

from data_preparation import prepare_genomes
from modelzoo import GenomeLM, cli
from modelzoo.config import ModelConfig
from modelzoo.data.sequences import read_records
from modelzoo.models import build_model
from modelzoo.tools import maps, mutations, score
from tests.helpers import GENOMES, tiny_params, write_params

CONTEXT = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: OpenMP wake-ups cost more than the math


def random_lm(name: str) -> GenomeLM:
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, hidden_size=32, num_hidden_layers=2, num_heads=4,
                      max_position_embeddings=CONTEXT)
    return GenomeLM(build_model(cfg), cfg)


@pytest.fixture(scope="module")
def sequences() -> list[str]:
    """1 to 90 codons (up to 3 windows), lower case and an N codon in some, a partial codon at the end of one."""
    rng = np.random.default_rng(0)
    out = []
    for k, n in enumerate([1, 2, 31, 32, 33, 62, 63, 64, 90]):
        seq = "".join(rng.choice(list("ACGT"), size=3 * n))
        if k % 3 == 2:
            seq = seq[:30] + "NNN" + seq[33:]
        out.append(seq.lower() if k == 4 else seq)
    out[5] += "AC"
    return out


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_per_codon_values_sum_to_log_likelihood(name, sequences):
    lm = random_lm(name)
    totals, counts = lm.log_likelihood(sequences, batch_size=3, return_counts=True)
    arrays = lm.codon_log_probs(sequences, batch_size=3)
    assert [len(a) for a in arrays] == [len(s) // 3 for s in sequences]
    assert [int(np.isfinite(a).sum()) for a in arrays] == counts.tolist()
    np.testing.assert_allclose([np.nansum(a) for a in arrays], totals, rtol=1e-6, atol=1e-4)
    for seq, values in zip(sequences, arrays):
        unk = [i for i in range(len(values)) if "N" in seq[3 * i: 3 * i + 3].upper()]
        assert np.isnan(values[unk]).all()  # [UNK] codons are not scored
        assert np.isnan(values[0]) == lm.is_causal  # nothing comes before a GPT's first codon
    streamed = [a for _, block in lm.codon_log_probs_stream(iter(sequences), batch_size=5) for a in block]
    for a, b in zip(streamed, lm.codon_log_probs(sequences, batch_size=5)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_codon_index_is_the_codon_scored(name, sequences):
    """Each value is the log-probability of the codon at its index, computed here directly from the
    window that scores it (GPT: windows overlapping by one codon; BERT: framed, that codon masked)."""
    lm = random_lm(name)
    seq = sequences[-1]  # 90 codons: three windows
    ids = torch.as_tensor(lm.tokenizer.encode(seq).astype(np.int64))
    values = lm.codon_log_probs([seq])[0]
    for i in [1, 5, 31, 32, 62, 63, 89]:
        with torch.no_grad():
            if lm.is_causal:
                start = (i - 1) // (CONTEXT - 1) * (CONTEXT - 1)
                window = ids[start: start + CONTEXT]
                logits = lm.model({"input_ids": window[None]})["logits"][0, i - start - 1]
            else:
                k = i // (CONTEXT - 2)
                window = torch.cat((torch.tensor([lm.tokenizer.cls_id]), ids[k * (CONTEXT - 2): (k + 1) * (CONTEXT - 2)],
                                    torch.tensor([lm.tokenizer.sep_id])))
                at = i - k * (CONTEXT - 2) + 1
                masked = window.clone()
                masked[at] = lm.tokenizer.mask_id
                logits = lm.model({"input_ids": masked[None], "attention_mask": torch.ones_like(masked)[None]})[
                    "logits"][0, at]
        assert values[i] == pytest.approx(float(logits.float().log_softmax(-1)[ids[i]]), abs=1e-5), i


@pytest.mark.parametrize("reading_frame", ["as_read", "longest_orf"])
def test_score_per_codon_writes_one_row_per_scored_codon(sequences, tmp_path, capsys, reading_frame):
    lm = random_lm("gpt2")
    model_dir = tmp_path / "md"
    model_dir.mkdir()
    from modelzoo.training.checkpoint import save_checkpoint
    params = {"model": lm.config.model_dump(), "train_input": {"reading_frame": reading_frame}}
    save_checkpoint(model_dir, 1, {"model": lm.model.state_dict(), "step": 1, "params": yaml.safe_dump(params)})
    fasta = tmp_path / "seqs.fasta"
    fasta.write_text("".join(f">s{k} description\n{seq}\n" for k, seq in enumerate(sequences)))
    out = tmp_path / "codons.tsv"
    assert score.main(["--model_dir", str(model_dir), "--input", str(fasta), "--output", str(out),
                       "--per_codon", "--batch_size", "4"]) == 0, capsys.readouterr().err
    header, *rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert header == ["id", "codon_index", "codon", "log_prob", "start"]
    lm.reading_frame = reading_frame  # as GenomeLM.load gives it from the saved params
    arrays = lm.codon_log_probs(sequences)
    expected = [(f"s{k}", i) for k, a in enumerate(arrays) for i in np.flatnonzero(np.isfinite(a))]
    assert [(r[0], int(r[1])) for r in rows] == expected  # scored codons only, in order
    offsets = [lm.tokenizer.frame_offset(seq, reading_frame) for seq in sequences]
    if reading_frame == "longest_orf":
        assert any(offsets), "no test sequence reads in another frame: the case is not covered"
    for sid, i, codon, logp, start in rows:
        seq, i, start = sequences[int(sid[1:])], int(i), int(start)
        assert start == offsets[int(sid[1:])] + 3 * i
        assert codon == seq[start: start + 3].upper() and "N" not in codon
        assert float(logp) == pytest.approx(arrays[int(sid[1:])][i], rel=1e-5, abs=1e-6)
    assert not any(r[0] == f"s{k}" and r[1] == "0" for k in range(len(sequences)) for r in rows)
    totals = lm.log_likelihood(sequences)
    for k, total in enumerate(totals):
        assert sum(float(r[3]) for r in rows if r[0] == f"s{k}") == pytest.approx(total, rel=1e-5, abs=1e-3)


# ---------------------------------------------------------------------- a planted mutation

FRAGMENT = 800  # codons of a real genome the model learns by heart


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A GPT-2 (hidden 32) trained ~5 s on an 800-codon stretch of a real genome, given at every
    offset of its 64-codon window (as genomes with different start points would give it), so that
    it knows the stretch wherever a window starts: mean log-probability about -0.2 nats per codon."""
    root = tmp_path_factory.mktemp("known")
    genome = next(read_records(GENOMES)).seq
    fragment = genome[300: 300 + 3 * FRAGMENT]
    (root / "fragment.fasta").write_text("".join(
        f">at_{k}\n{genome[300 + 3 * k: 300 + 3 * (k + FRAGMENT)]}\n" for k in range(64)))
    assert prepare_genomes.main(["--input", str(root / "fragment.fasta"), "--output_dir", str(root / "shards"),
                                 "--max_seq_length", "64", "--split", "1,0,0"]) == 0
    steps = 500
    params = tiny_params(root / "shards", root / "md", max_steps=steps, log_steps=steps, checkpoint_steps=steps,
                         seed=0)
    del params["eval_input"], params["runconfig"]["eval_steps"]
    params["train_input"]["batch_size"] = 8
    params["model"]["dropout_rate"] = params["optimizer"]["weight_decay"] = 0.0
    warm_up, decay = params["optimizer"]["learning_rate"]
    warm_up["end_learning_rate"] = decay["initial_learning_rate"] = 0.01
    warm_up["total_iters"], decay["end_learning_rate"], decay["total_iters"] = 10, 0.001, steps - 10
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures start before the one_thread fixture)
    try:
        assert cli.main(["CPU", "--params", str(write_params(root / "params.yaml", params))]) == 0
    finally:
        torch.set_num_threads(threads)
    (root / "reference.fasta").write_text(f">reference\n{fragment}\n")
    return root, fragment


def planted(fragment: str, codon_index: int) -> tuple[str, str]:
    """The fragment with the middle base of one codon changed; and the new codon."""
    at = 3 * codon_index + 1
    base = {"A": "C", "C": "G", "G": "T", "T": "A"}[fragment[at]]
    mutant = fragment[:at] + base + fragment[at + 1:]
    return mutant, mutant[3 * codon_index: 3 * codon_index + 3]


def test_a_planted_mutation_is_among_the_least_likely_codons(known, tmp_path, capsys):
    root, fragment = known
    lm = GenomeLM.load(root / "md")
    bound = (FRAGMENT - 1) // 100  # the lowest 1% of the scored codons
    for index in (150, 431, 700):
        values = lm.codon_log_probs([planted(fragment, index)[0]])[0]
        assert 1 + np.sum(values < values[index]) <= bound, index

    index = 555
    mutant, codon = planted(fragment, index)
    inputs = tmp_path / "genomes.fasta"
    inputs.write_text(f">mutant\n{mutant}\n>unchanged\n{fragment}\n>shorter\n{fragment[:-3]}\n"
                      f">with_N\n{fragment[:3 * index] + 'NNN' + fragment[3 * index + 3:]}\n")
    out = tmp_path / "mutations"
    code = mutations.main(["--model_dir", str(root / "md"), "--input", str(inputs), "--reference",
                           str(root / "reference.fasta"), "--output_dir", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "1 differing codons in 3 genomes" in text.out and "skipped 1" in text.out and "shorter" in text.out
    header, *rows = [line.split("\t") for line in (out / "differences.tsv").read_text().splitlines()]
    assert header == ["id", "codon_index", "reference_codon", "codon", "log_prob", "rank", "scored_codons"]
    assert len(rows) == 1  # the unchanged genome has none, an N codon is no call, the shorter is skipped
    rid, i, ref_codon, alt_codon, logp, rank, scored = rows[0]
    assert (rid, int(i), ref_codon, alt_codon) == ("mutant", index, fragment[3 * index: 3 * index + 3], codon)
    assert int(scored) == FRAGMENT - 1 and int(rank) <= bound
    assert float(logp) == pytest.approx(lm.codon_log_probs([mutant])[0][index], rel=1e-5)
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == ["log_probs_0001_mutant.png", "log_probs_0002_unchanged.png", "log_probs_0003_with_N.png"]
    assert (out / plots[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mutations_refuses_a_reference_of_several_records(known, tmp_path, capsys):
    root, fragment = known
    two = tmp_path / "two.fasta"
    two.write_text(f">a\n{fragment}\n>b\n{fragment}\n")
    code = mutations.main(["--model_dir", str(root / "md"), "--input", str(two), "--reference", str(two),
                           "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "more than one record" in err
    assert not (tmp_path / "out").exists()


def test_log_prob_plot_of_a_genome_with_nothing_scored(tmp_path):
    path = tmp_path / "one.png"
    maps.draw_log_probs(np.array([math.nan]), path, "one codon", [(0, "0 AAA>AAC")])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
