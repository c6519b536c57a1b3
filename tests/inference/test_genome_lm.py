"""GenomeLM: embeddings over windows, KV-cached generation, log-likelihood and BERT PLL."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from modelzoo import GenomeLM
from modelzoo.config import ModelConfig
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import CheckpointError, ConfigError, DataError
from modelzoo.inference import STOP_CODONS
from modelzoo.models import MODELS, build_model
from modelzoo.models.layers import KVCache
from modelzoo.training.checkpoint import save_checkpoint

CAUSAL = [name for name, spec in MODELS.items() if spec.generates]

CONTEXT = 16
TOK = CodonTokenizer()
CODONS = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT"]


@pytest.fixture(autouse=True)
def no_grad_one_thread():
    # Reference computations below call the model directly (no autograd needed). One thread:
    # these tensors are tiny, and on a busy machine waking OpenMP workers costs more than the math.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


def make_lm(name, **extra) -> GenomeLM:
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, hidden_size=32, num_hidden_layers=2, num_heads=4,
                      max_position_embeddings=CONTEXT, **extra)
    return GenomeLM(build_model(cfg), cfg)


def random_genome(codons: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(CODONS, size=codons))


def ids_of(seq: str) -> torch.Tensor:
    return torch.from_numpy(TOK.encode(seq).astype(np.int64))[None]


# ------------------------------------------------------------------ embeddings

@pytest.mark.parametrize("name", CAUSAL)
def test_causal_embedding_is_the_mean_over_every_codon_of_every_window(name):
    lm = make_lm(name)
    genome = random_genome(2 * CONTEXT + 5)  # three windows: 16, 16 and 5 codons
    ids = ids_of(genome)
    states = [lm.model.hidden_states({"input_ids": ids[:, s: s + CONTEXT]})[-1][0] for s in (0, 16, 32)]
    expected = torch.cat(states).mean(0).numpy()
    got = lm.embed([genome, random_genome(3, seed=1)], pooling="mean", batch_size=2)
    assert got.shape == (2, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lm.embed([genome], pooling="mean", batch_size=1)[0], got[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CAUSAL)
def test_surprise_pooling_weights_each_codon_by_its_squared_surprisal(name):
    """A GPT's default embedding: layer 0 (codon embeddings) averaged with weights
    (-log p(codon | the codons before it in its window))^2; a window's first codon has no weight."""
    lm = make_lm(name)
    genome = random_genome(16)[:24] + "NNN" + random_genome(2 * CONTEXT + 5, seed=2)[27:]
    ids = ids_of(genome)
    sums, total = 0, 0
    for s in (0, 16, 32):
        window = ids[:, s: s + CONTEXT]
        states = lm.model.hidden_states({"input_ids": window})
        logp = lm.model({"input_ids": window})["logits"][0, :-1].log_softmax(-1)
        surprisal = -logp.gather(-1, window[0, 1:, None])[:, 0]
        weights = torch.cat([torch.zeros(1), surprisal.square()])
        weights[window[0] == TOK.unk_id] = 0  # [UNK] is neither pooled
        sums = sums + (states[0][0] * weights[:, None]).sum(0)
        total = total + weights.sum()
    expected = (sums / total).numpy()
    np.testing.assert_allclose(lm.embed([genome], batch_size=2)[0], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(lm.embed([genome], pooling="surprise", layer=0)[0], expected, rtol=1e-4, atol=1e-6)
    assert lm.default_pooling == "surprise"
    with pytest.raises(ConfigError, match="needs a GPT model"):
        make_lm("bert").embed(["ATGAAA"], pooling="surprise")


def test_unknown_codons_are_seen_but_not_pooled():
    lm = make_lm("gpt2")
    genome = random_genome(10)[:9] + "NNN" + random_genome(10)[12:]
    states = lm.model.hidden_states({"input_ids": ids_of(genome)})[1][0]  # layer 1
    keep = torch.ones(10, dtype=torch.bool)
    keep[3] = False
    np.testing.assert_allclose(lm.embed([genome], layer=1, pooling="mean")[0], states[keep].mean(0).numpy(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="no whole A/C/G/T codon"):
        lm.embed(["NNNNNN"])


def test_bert_windows_are_framed_and_cls_pooling_averages_windows():
    lm = make_lm("bert")
    genome = random_genome(20)  # windows of 14 codons (+ [CLS], [SEP]): 14 and 6
    ids = TOK.encode(genome).astype(np.int64)
    frames = [np.concatenate(([TOK.cls_id], ids[s: s + 14], [TOK.sep_id])) for s in (0, 14)]
    states = [lm.model.hidden_states({"input_ids": torch.from_numpy(f)[None]})[-1][0] for f in frames]
    np.testing.assert_allclose(lm.embed([genome], pooling="cls")[0],
                               torch.stack([s[0] for s in states]).mean(0).numpy(), rtol=1e-5, atol=1e-6)
    codon_mean = torch.cat([s[1:-1] for s in states]).mean(0).numpy()
    np.testing.assert_allclose(lm.embed([genome])[0], codon_mean, rtol=1e-5, atol=1e-5)


def test_embed_rejects_bad_layer_and_pooling():
    lm = make_lm("gpt2")
    both = lm.embed(["ATGAAACCC", "CCCGGG"], layer=[0, -1], pooling="mean")
    assert both.shape == (2, 2, 32) and not np.allclose(both[0], both[1])
    np.testing.assert_allclose(both[1], lm.embed(["ATGAAACCC", "CCCGGG"], layer=2, pooling="mean"), rtol=1e-6)
    with pytest.raises(ConfigError, match="layers 0..2"):
        lm.embed(["ATG"], layer=3)
    with pytest.raises(ConfigError, match="needs a BERT"):
        lm.embed(["ATG"], pooling="cls")


def _genslm_embeddings(lm, sequences) -> np.ndarray:
    """GenSLM's embeddings by GenSLM's code path (run_inference.py's dataset and
    AverageEmbeddingsCallback): its tokenizer on the sequence grouped by three and uppercased,
    truncated and padded to max_length; a transformers GPTNeoXForCausalLM holding lm's weights;
    hidden_states[-1] (after final_layer_norm) averaged over the first attention_mask.sum() positions."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from modelzoo.models import hf
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(TOK.json_path)))
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    twin = transformers.GPTNeoXForCausalLM(hf.hf_config(lm.config)).eval()
    weights = hf.to_hf_state(lm.config, lm.model.state_dict())
    result = twin.load_state_dict({k.replace("embed_out.", "lm_head."): v for k, v in weights.items()}, strict=False)
    assert result.missing_keys == []
    vectors = []
    for seq in sequences:
        grouped = " ".join(seq[i: i + 3] for i in range(0, len(seq), 3)).upper()
        batch = tokenizer(grouped, max_length=CONTEXT, padding="max_length", truncation=True, return_tensors="pt")
        out = twin(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        seq_len = int(batch["attention_mask"].sum())
        vectors.append(out.hidden_states[-1][0, :seq_len].mean(0).numpy())
    return np.stack(vectors)


def test_genslm_pooling_is_genslms_recipe_exactly():
    lm = make_lm("gpt_neox")
    sequences = [random_genome(CONTEXT + 9),  # only the first CONTEXT codons count
                 random_genome(7, seed=1).lower() + "AC",  # lowercase; the partial codon is one [UNK]
                 random_genome(4, seed=2) + "NNN" + random_genome(3, seed=3) + "ACU"]  # [UNK]s averaged too
    np.testing.assert_allclose(lm.embed(sequences, pooling="genslm", batch_size=2), _genslm_embeddings(lm, sequences),
                               rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="pooling 'genslm' needs a GPT model"):
        make_lm("bert").embed(["ATG"], pooling="genslm")


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "bert"])
def test_layer_final_is_the_final_norms_output(name):
    lm = make_lm(name)
    genome = random_genome(10)
    ids = ids_of(genome) if name != "bert" else \
        torch.from_numpy(np.concatenate(([TOK.cls_id], TOK.encode(genome), [TOK.sep_id])).astype(np.int64))[None]
    last = lm.model.hidden_states({"input_ids": ids})[-1][0]
    final = last if name == "bert" else lm.model.head.ln_f(last)  # BERT normalises in each block: nothing after
    codons = slice(None) if name != "bert" else slice(1, -1)
    np.testing.assert_allclose(lm.embed([genome], layer="final", pooling="mean")[0], final[codons].mean(0).numpy(),
                               rtol=1e-5, atol=1e-6)
    both = lm.embed([genome], layer=["final", -1], pooling="mean")
    assert both.shape == (2, 1, 32) and (name == "bert") == np.allclose(both[0], both[1])
    with pytest.raises(ConfigError, match="and 'final'"):
        lm.embed([genome], layer="last")


# ------------------------------------------------------------------ KV cache and generation

@pytest.mark.parametrize("name", CAUSAL)
def test_cached_logits_equal_full_forward(name):
    lm = make_lm(name)
    ids = ids_of(random_genome(CONTEXT))
    full = lm.model({"input_ids": ids})["logits"]
    cache = KVCache()
    steps = [lm.model({"input_ids": ids[:, :5], "cache": cache})["logits"]]  # prefill, then one at a time
    steps += [lm.model({"input_ids": ids[:, t: t + 1], "cache": cache})["logits"] for t in range(5, CONTEXT)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CAUSAL)
def test_cached_generation_equals_full_recompute(name):
    lm = make_lm(name)
    # 40 codons after a 4-codon prompt: the window slides twice past the 16-codon context
    greedy = lm.generate("ATGGCTAAACCC", max_codons=40, temperature=0, num_return_sequences=2)
    assert greedy == lm.generate("ATGGCTAAACCC", max_codons=40, temperature=0, num_return_sequences=2,
                                 use_cache=False)
    sampled = lm.generate("ATG", max_codons=30, seed=5, top_k=20, top_p=0.9, num_return_sequences=3)
    assert sampled == lm.generate("ATG", max_codons=30, seed=5, top_k=20, top_p=0.9, num_return_sequences=3,
                                  use_cache=False)


def test_generation_is_reproducible_and_only_codons():
    lm = make_lm("gpt2")
    a = lm.generate("ATG", max_codons=25, seed=1, num_return_sequences=4, temperature=1.5)
    assert a == lm.generate("ATG", max_codons=25, seed=1, num_return_sequences=4, temperature=1.5)
    assert a != lm.generate("ATG", max_codons=25, seed=2, num_return_sequences=4, temperature=1.5)
    for seq in a:
        assert seq.startswith("ATG") and len(seq) == 3 * 26 and set(seq) <= set("ACGT")


def test_special_tokens_are_never_sampled_even_when_likeliest():
    lm = make_lm("gpt2")
    lm.model.embeddings.tokens.weight[:5] *= 100  # make [UNK], [PAD], [MASK]... overwhelmingly likely
    for seq in lm.generate("ATG", max_codons=20, seed=0, num_return_sequences=3) + \
            lm.generate("ATG", max_codons=20, temperature=0):
        assert len(seq) == 63 and set(seq) <= set("ACGT")


def test_stop_at_stop_codon_ends_each_sequence_at_its_first_stop():
    lm = make_lm("gptj")
    seqs = lm.generate("ATG", max_codons=200, seed=0, num_return_sequences=6, temperature=2.0,
                       stop_at_stop_codon=True)
    for seq in seqs:
        codons = [seq[i: i + 3] for i in range(0, len(seq), 3)]
        assert codons[-1] in STOP_CODONS and not set(codons[1:-1]) & set(STOP_CODONS)
    assert any(len(s) < 3 * 201 for s in seqs)


def test_generation_refuses_bert_and_bad_arguments():
    with pytest.raises(ConfigError, match="causal model"):
        make_lm("bert").generate("ATG", max_codons=3)
    lm = make_lm("gpt2")
    for bad in ("", "AT", "ATGNNN"):
        with pytest.raises(ConfigError, match="whole codons"):
            lm.generate(bad, max_codons=3)
    with pytest.raises(ConfigError, match="top_p"):
        lm.generate("ATG", max_codons=3, top_p=1.5)


# ------------------------------------------------------------------ log-likelihood

@pytest.mark.parametrize("name", CAUSAL)
def test_log_likelihood_is_minus_the_summed_token_cross_entropy(name):
    lm = make_lm(name)
    genome = random_genome(CONTEXT)
    ids = ids_of(genome)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    loss = lm.model({"input_ids": ids, "labels": labels})["loss"]
    total, = lm.log_likelihood([genome])
    assert total == pytest.approx(-loss.item() * (CONTEXT - 1), rel=1e-5)
    assert lm.log_likelihood([genome], per_codon_mean=True)[0] == pytest.approx(total / (CONTEXT - 1), rel=1e-6)


@pytest.mark.parametrize("name", CAUSAL)
def test_score_unk_scores_unknown_targets_as_genslm_does(name):
    lm = make_lm(name)
    genome = random_genome(5) + "NNN" + random_genome(4, seed=1) + "NRY" + random_genome(4, seed=2)
    ids = ids_of(genome)[0]
    logp = lm.model({"input_ids": ids[None]})["logits"][0, :-1].log_softmax(-1).gather(-1, ids[1:, None])[:, 0]
    is_unk = ids[1:] == TOK.unk_id
    assert int(is_unk.sum()) == 2
    totals, counts = lm.log_likelihood([genome], return_counts=True, score_unk=True)
    assert counts.tolist() == [14] and totals[0] == pytest.approx(logp.sum().item(), rel=1e-5)
    totals, counts = lm.log_likelihood([genome], return_counts=True)
    assert counts.tolist() == [12] and totals[0] == pytest.approx(logp[~is_unk].sum().item(), rel=1e-5)
    per_codon = lm.codon_log_probs([genome], score_unk=True)[0]
    np.testing.assert_allclose(per_codon[1:], logp.double().numpy(), rtol=1e-5)
    assert np.isnan(per_codon[0])


def test_score_unk_in_bert_masks_unknown_positions_too():
    lm = make_lm("bert")
    genome = random_genome(3) + "NNN" + random_genome(2, seed=1)
    assert lm.log_likelihood([genome], return_counts=True)[1].tolist() == [5]
    values, counts = lm.log_likelihood([genome], return_counts=True, score_unk=True)
    assert counts.tolist() == [6]
    assert np.nansum(lm.codon_log_probs([genome], score_unk=True)[0]) == pytest.approx(values[0], rel=1e-5)


def test_long_sequences_are_scored_in_windows_overlapping_by_one_codon():
    lm = make_lm("gpt2")
    genome = random_genome(40)
    pieces = [genome[3 * s: 3 * (s + CONTEXT)] for s in (0, 15, 30)]  # every codon but the first, once
    totals, counts = lm.log_likelihood([genome] + pieces, batch_size=3, return_counts=True)
    assert counts.tolist() == [39, 15, 15, 9]
    assert totals[0] == pytest.approx(totals[1:].sum(), rel=1e-5)


def test_bert_pseudo_log_likelihood_masks_one_codon_at_a_time():
    lm = make_lm("bert")
    genome = random_genome(5)
    ids = torch.from_numpy(np.concatenate(([TOK.cls_id], TOK.encode(genome), [TOK.sep_id])).astype(np.int64))
    expected = 0.0
    for p in range(1, 6):
        masked = ids.clone()
        masked[p] = TOK.mask_id
        logits = lm.model({"input_ids": masked[None]})["logits"][0, p]
        expected += logits.log_softmax(-1)[ids[p]].item()
    scores, counts = lm.log_likelihood([genome, random_genome(30, seed=3)], batch_size=4, return_counts=True)
    assert scores.shape == (2,) and counts.tolist() == [5, 30] and (scores < 0).all()
    assert scores[0] == pytest.approx(expected, rel=1e-5)


def test_a_classifier_has_no_codon_probabilities():
    with pytest.raises(ConfigError, match="sequence classifier"):
        make_lm("bert", num_labels=3).log_likelihood(["ATGAAA"])


# ------------------------------------------------------------------ loading

def test_load_restores_the_checkpoint_and_reports_bad_paths(tmp_path):
    lm = make_lm("gptj")
    params = yaml.safe_dump({"model": lm.config.model_dump()})
    save_checkpoint(tmp_path, 7, {"model": lm.model.state_dict(), "step": 7, "params": params, "model_name": "gptj"})
    loaded = GenomeLM.load(tmp_path)
    assert loaded.step == 7 and loaded.config == lm.config
    np.testing.assert_array_equal(loaded.embed(["ATGAAACCCGGG"]), lm.embed(["ATGAAACCCGGG"]))
    with pytest.raises(CheckpointError, match="no such model_dir"):
        GenomeLM.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no good checkpoint"):
        GenomeLM.load(tmp_path / "empty")


def test_embed_and_score_tools_take_genslms_recipes(tmp_path, capsys):
    """--pooling genslm --layer final and --score_unk reach GenomeLM unchanged."""
    from modelzoo.tools import embed, score
    lm = make_lm("gpt_neox")
    params = yaml.safe_dump({"model": lm.config.model_dump()})
    (tmp_path / "md").mkdir()
    save_checkpoint(tmp_path / "md", 1, {"model": lm.model.state_dict(), "step": 1, "params": params,
                                         "model_name": "gpt_neox"})
    genomes = [random_genome(20) + "NNN" + random_genome(4, seed=1), random_genome(9, seed=2)]
    fasta = tmp_path / "g.fasta"
    fasta.write_text("".join(f">g{i}\n{g}\n" for i, g in enumerate(genomes)))
    assert embed.main(["--model_dir", str(tmp_path / "md"), "--input", str(fasta), "--output_dir",
                       str(tmp_path / "emb"), "--pooling", "genslm", "--layer", "final"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "emb" / "embeddings.npy"), lm.embed(genomes, pooling="genslm"),
                               rtol=1e-6)
    assert score.main(["--model_dir", str(tmp_path / "md"), "--input", str(fasta), "--output",
                       str(tmp_path / "s.tsv"), "--score_unk"]) == 0
    rows = [line.split("\t") for line in (tmp_path / "s.tsv").read_text().splitlines()[1:]]
    totals, counts = lm.log_likelihood(genomes, return_counts=True, score_unk=True)
    assert [int(r[1]) for r in rows] == counts.tolist() == [24, 8]
    np.testing.assert_allclose([float(r[2]) for r in rows], totals, atol=1e-3)
    with pytest.raises(SystemExit):
        embed.main(["--model_dir", str(tmp_path / "md"), "--input", str(fasta), "--output_dir", str(tmp_path / "x"),
                    "--layer", "last"])
    assert "'last': an integer layer index or 'final'" in capsys.readouterr().err


def test_import_stays_light():
    code = ("import sys; from modelzoo import GenomeLM; "
            "heavy = [m for m in ('transformers', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
