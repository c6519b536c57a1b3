"""Packed inference (issue 28): short records share a window with document attention, long ones
are cut into windows, batches are planned by length under a token budget; every record's
results equal its own unpacked pass, and the tools write what they wrote before packing."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from modelzoo import GenomeLM
from modelzoo import inference_batching as batching
from modelzoo.config import ModelConfig
from modelzoo.models import build_model
from tests.inference import before

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: OpenMP wake-ups cost more than the math

CONTEXT = 16
LENGTHS = [1, 2, 3, 5, 7, 9, 14, 15, 16, 17, 30, 33, 40, 4, 6, 2]  # codons: most share a window, some need 2-3


def make_lm(name: str) -> GenomeLM:
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, hidden_size=32, num_hidden_layers=2, num_heads=4, max_position_embeddings=CONTEXT)
    return GenomeLM(build_model(cfg), cfg)


def genomes() -> list[str]:
    rng = np.random.default_rng(1)
    out = ["".join(rng.choice(list("ACGT"), size=3 * n)) for n in LENGTHS]
    out[4] = out[4][:6] + "NNN" + out[4][9:]  # an [UNK] inside a packed record
    return out


ALONE = dict(batch_tokens=1)  # one window per pass, nothing packed: each record's own pass


def packs(lm: GenomeLM, sequences, budget: int) -> bool:
    """Whether some batch of the default plan puts several records in one row."""
    lengths = [len(w) for s in sequences for w in lm._windows(lm.tokenizer.encode(s))]
    return any(len(row) > 1 for rows in batching.plan(lengths, budget) for row in rows)


@pytest.mark.parametrize("name", ["gpt2", "gptj", "gpt_neox", "bert"])
def test_packed_embeddings_equal_each_record_alone(name):
    lm = make_lm(name)
    seqs = genomes()
    assert packs(lm, seqs, 4 * CONTEXT)
    poolings = ["mean", "cls"] if name == "bert" else ["surprise", "mean", "genslm"]
    for pooling in poolings:
        layers = [0, 1, -1, "final"]
        packed = lm.embed(seqs, layer=layers, pooling=pooling, batch_tokens=4 * CONTEXT)
        alone = lm.embed(seqs, layer=layers, pooling=pooling, **ALONE)
        np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5, err_msg=pooling)


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "bert"])
def test_packed_scores_equal_each_record_alone(name):
    lm = make_lm(name)
    seqs = genomes()
    for score_unk in (False, True):
        packed, counts = lm.log_likelihood(seqs, return_counts=True, score_unk=score_unk, batch_tokens=4 * CONTEXT)
        alone, alone_counts = lm.log_likelihood(seqs, return_counts=True, score_unk=score_unk, **ALONE)
        np.testing.assert_allclose(packed, alone, rtol=1e-5)
        assert counts.tolist() == alone_counts.tolist()
        per_codon = lm.codon_log_probs(seqs, score_unk=score_unk, batch_tokens=4 * CONTEXT)
        for got, expected, total in zip(per_codon, lm.codon_log_probs(seqs, score_unk=score_unk, **ALONE), packed):
            np.testing.assert_allclose(got, expected, rtol=1e-5)  # NaN where not scored, on both sides
            assert np.nansum(got) == pytest.approx(total, rel=1e-5)


def test_plan_fills_rows_by_length_within_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=300).tolist() + [200] * 5
    batches = batching.plan(lengths, batch_tokens=1000)
    placed = sorted(i for rows in batches for row in rows for i in row)
    assert placed == list(range(len(lengths)))  # every piece once
    padded = 0
    for rows in batches:
        width = max(lengths[i] for row in rows for i in row)
        assert lengths[rows[0][0]] == width and len(rows) * width <= max(1000, width)
        assert all(sum(lengths[i] for i in row) <= width for row in rows)
        padded += len(rows) * width
    assert padded < 1.1 * sum(lengths)  # length-aware: little padding for mixed lengths
    assert all(sum(len(row) for row in rows) <= 7 for rows in batching.plan(lengths, 1000, max_pieces=7))


def test_rounds_keep_memory_to_a_round_and_results_in_input_order():
    lm = make_lm("gpt2")
    seqs = genomes() * 20
    read = []

    def reading():
        for s in seqs:
            read.append(s)
            yield s

    blocks = lm.log_likelihood_stream(reading(), batch_tokens=2 * CONTEXT)
    done, (first, _) = next(blocks)
    assert len(done) < len(seqs) and done == read[:len(done)]  # a round read, not the input
    streamed = np.concatenate([first] + [v for _, (v, _) in blocks])
    np.testing.assert_array_equal(streamed, lm.log_likelihood(seqs, batch_tokens=2 * CONTEXT))


# ------------------------------------------------------------------ the tools, against the code before packing

@pytest.fixture(scope="module")
def before_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("before")
    return before.records(root / "records.fasta"), {m: before.model_dir(root / "models", m) for m in before.MODELS}


@pytest.mark.parametrize("tool,model,flags,compared", before.RUNS, ids=[before.run_name(*r[:3]) for r in before.RUNS])
def test_tools_write_what_they_wrote_before_packing(tool, model, flags, compared, before_inputs, tmp_path):
    fasta, dirs = before_inputs
    name = before.run_name(tool, model, flags)
    got = before.run_tool(tool, dirs[model], fasta, tmp_path / name, flags)
    saved = before.SAVED / f"{name}{Path(compared).suffix}"
    if saved.suffix == ".npy":
        np.testing.assert_allclose(np.load(got), np.load(saved), rtol=1e-5, atol=1e-6)
        return
    rows = [line.split("\t") for line in got.read_text().splitlines()]
    expected = [line.split("\t") for line in saved.read_text().splitlines()]
    assert len(rows) == len(expected) and rows[0] == expected[0]
    for row, old in zip(rows[1:], expected[1:]):
        for a, b in zip(row, old):  # ids and counts equal; figures up to their last printed digit
            if a != b:
                assert math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=2e-4), (row, old)


# ------------------------------------------------------------------ precision: the training runs' decision

def test_precision_follows_the_model_configs_mixed_precision(monkeypatch):
    from modelzoo.models import layers
    seqs = genomes()[:6]
    plain = make_lm("gpt2")
    fp32 = plain.embed(seqs, pooling="mean")
    assert plain.precision == "float32"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's own autocast is left in force
        assert not np.allclose(plain.embed(seqs, pooling="mean"), fp32, rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    for setting, speedup, dtype in [(True, 0.5, "bfloat16"), ("auto", 2.0, "bfloat16"), ("auto", 0.5, "float32"),
                                    (False, 2.0, "float32")]:
        monkeypatch.setattr(layers, "cpu_matmul_speedups", {torch.bfloat16: speedup})
        cfg = plain.config.model_copy(update={"mixed_precision": True, "mixed_precision_on_cpu": setting})
        lm = GenomeLM(plain.model, cfg)
        assert lm.precision == dtype, (setting, speedup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            expected = plain.embed(seqs, pooling="mean")
        np.testing.assert_array_equal(lm.embed(seqs, pooling="mean"), expected)
        with pytest.warns(DeprecationWarning, match="bf16"):  # the old flag still computes in bfloat16
            old = lm.embed(seqs, pooling="mean", bf16=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            np.testing.assert_array_equal(old, plain.embed(seqs, pooling="mean"))


# ------------------------------------------------------------------ embed's projector, streamed from disk

@pytest.mark.parametrize("header", [["id"], ["id", "clade"]])
def test_streamed_projector_writes_what_add_embedding_writes(header, tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from modelzoo.embedding_projector import write_projector
    vectors = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)
    rows = [[f"r{k}"] + (["AB"[k % 2]] if len(header) > 1 else []) for k in range(9)]
    with SummaryWriter(log_dir=str(tmp_path / "theirs")) as writer:
        writer.add_embedding(torch.from_numpy(vectors), metadata=[r[0] for r in rows] if len(header) == 1 else rows,
                             metadata_header=header if len(header) > 1 else None, tag="embeddings")
    ours = tmp_path / "ours"
    ours.mkdir()
    np.save(ours / "v.npy", vectors)
    (ours / "ids.tsv").write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n")
    write_projector(ours, ours / "v.npy", ours / "ids.tsv")
    for name in ("projector_config.pbtxt", "00000/embeddings/tensors.tsv", "00000/embeddings/metadata.tsv"):
        assert (ours / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name
    assert len(list(ours.glob("events.out.tfevents.*"))) == 1
