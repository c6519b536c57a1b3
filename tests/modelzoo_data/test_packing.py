"""Packed windows and document attention: a packed batch computes exactly what unpacked training
computes over the same records (targets, positions, attention), on every causal model, on the
resident CPU backend and on CSX; no record sees another."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from modelzoo.backends.csx import CSXBackend
from modelzoo.backends.resident import ResidentBackend
from modelzoo.config import ModelConfig, load_params, validate_params
from modelzoo.data.datasets import (CausalLMDataset, MaskedLMDataset, build_dataloader, dataset_for,
                                    document_layout)
from modelzoo.data.shards import MANIFEST, ShardSet
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import ConfigError
from modelzoo.models import MODELS, build_model
from modelzoo.models.layers import Attention, Rotary, document_mask, document_runs
from tests.helpers import REPO, tiny_config

TOK = CodonTokenizer()
SEP, PAD, UNK = TOK.sep_id, TOK.pad_id, TOK.unk_id
L = 32
# short records, one of exactly L - 1 codons (fits with its [SEP]), one of L (a window of its own),
# longer ones cut into windows as unpacked; a few [UNK]s, which are never targets
LENGTHS = [5, 12, 3, 20, 31, 7, 32, 9, 45, 2, 14, 70, 11, 6, 17, 1, 25, 8, 4, 13]


def make_records(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    records = []
    for i, n in enumerate(LENGTHS):
        ids = rng.choice(TOK.codon_ids, size=n).astype(np.uint8)
        if i % 5 == 3:
            ids[n // 2] = UNK
        records.append((f"r{i}", ids))
    return records


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The same records prepared by prepare_genomes one per window and packed (--pack_sequences)."""
    from data_preparation.prepare_genomes import main as prepare_genomes
    root = tmp_path_factory.mktemp("packing")
    fasta = root / "records.fasta"
    fasta.write_text("".join(f">{rid}\n{TOK.decode(ids)}\n" for rid, ids in make_records()))
    out = {}
    for kind, flags in (("unpacked", []), ("packed", ["--pack_sequences"])):
        argv = ["--input", str(fasta), "--output_dir", str(root / kind), "--max_seq_length", str(L),
                "--split", "1,0,0", "--min_codons", "1", "--num_workers", "1", *flags]
        assert prepare_genomes(argv) in (0, None)
        out[kind] = root / kind / "train"
    assert json.loads((out["packed"] / MANIFEST).read_text())["packed"] is True
    return out


def tiny(name: str, **kw) -> ModelConfig:
    return tiny_config(name, max_position_embeddings=L, **kw)


def params_for(data_dir, name: str, packed: bool, tmp_path, **section):
    return validate_params({
        "eval_input": {"data_dir": str(data_dir), "batch_size": 3, "max_seq_length": L, "pack_sequences": packed,
                       **section},
        "model": tiny(name).model_dump(exclude_none=True),
        "runconfig": {"mode": "eval", "model_dir": str(tmp_path / "model")}},
        check_paths=False)  # the dataloader's own check against the shards is what these tests reach


def eval_loss(backend, params) -> tuple[float, int]:
    cfg = params.eval_input
    cls, kwargs = dataset_for(params.model, cfg, 0)
    loader = build_dataloader(cfg.data_dir, cfg.batch_size, shuffle=False, shuffle_seed=0, max_seq_length=L,
                              dataset_cls=cls, dataset_kwargs=kwargs, pad_last=True)
    batches = iter(loader)
    loss_sum = tokens = 0
    for _ in range(loader.num_batches_per_epoch):
        m = backend.eval_step(next(batches))
        loss_sum, tokens = loss_sum + m["loss_sum"], tokens + m["tokens"]
    return loss_sum / tokens, tokens


# ------------------------------------------------------------ the data

def test_document_layout_restarts_positions_and_closes_records_at_sep():
    ids = torch.tensor([10, 11, 12, SEP, 20, 21, SEP, 30, SEP, PAD, PAD])
    documents, positions = document_layout(ids, SEP, PAD)
    assert documents.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, -1, -1]
    assert positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 0]
    long_record = torch.tensor([10, 11, 12, 13])  # a window of a record longer than a window
    assert document_layout(long_record, SEP, PAD)[1].tolist() == [0, 1, 2, 3]


def test_packed_labels_are_the_unpacked_targets(shards):
    """Every record's targets, in order: [SEP] is never a target and predicts nothing; [UNK] and
    [PAD] are never targets."""
    def targets(data_dir, packed):
        ds = CausalLMDataset(ShardSet(data_dir), pack_sequences=packed)
        out = []
        for i in range(len(ds)):
            item = ds[i]
            keep = item["labels"] != -100
            out += list(zip(item["input_ids"][keep].tolist(), item["labels"][keep].tolist()))
        return out
    packed, unpacked = targets(shards["packed"], True), targets(shards["unpacked"], False)
    assert sorted(packed) == sorted(unpacked) and len(packed) == len(unpacked)
    assert all(SEP not in pair and UNK != pair[1] for pair in packed)
    item = CausalLMDataset(ShardSet(shards["packed"]), pack_sequences=True)[0]
    assert {"document_ids", "position_ids"} <= set(item)
    plain = CausalLMDataset(ShardSet(shards["packed"]), pack_sequences=True, document_attention=False)[0]
    assert "document_ids" not in plain and torch.equal(plain["labels"], item["labels"])


def test_pack_sequences_must_match_the_shards(shards, tmp_path):
    for data_dir, packed, words in ((shards["unpacked"], True, "not packed"),
                                    (shards["packed"], False, "are packed")):
        params = params_for(data_dir, "gpt2", packed, tmp_path)
        cls, kwargs = dataset_for(params.model, params.eval_input, 0)
        with pytest.raises(ConfigError) as e:
            build_dataloader(data_dir, 3, False, 0, dataset_cls=cls, dataset_kwargs=kwargs)
        message = str(e.value)
        assert "pack_sequences" in message and str(data_dir) in message and words in message
        assert "\n" not in message


def test_a_classifier_refuses_pack_sequences_in_one_line(shards, tmp_path):
    with pytest.raises(ConfigError) as e:
        validate_params({"eval_input": {"data_dir": str(shards["packed"]), "batch_size": 3, "max_seq_length": L,
                                        "pack_sequences": True, "labels_file": "x.tsv", "label_column": "c"},
                         "model": tiny("bert", num_labels=2).model_dump(exclude_none=True),
                         "runconfig": {"mode": "eval"}}, check_paths=False)
    assert "eval_input.pack_sequences" in str(e.value) and "\n" not in str(e.value)


def test_bert_packs_framed_records_whole_with_the_masks_of_unpacked_windows(shards):
    """[CLS] r1 [SEP] [CLS] r2 [SEP] ...: the framed pieces of unpacked BERT windows, back to back,
    never split, each masked as it is unpacked; positions restart at every [CLS]."""
    unpacked = MaskedLMDataset(ShardSet(shards["unpacked"]), seed=3)
    packed = MaskedLMDataset(ShardSet(shards["packed"]), seed=3, pack_sequences=True)
    assert len(packed) < len(unpacked)
    pieces = []
    for i in range(len(packed)):
        item = packed[i]
        for j, at, size in packed.windows.pieces_of(i):
            assert item["input_ids"][at] == TOK.cls_id and item["position_ids"][at] == 0
            assert (item["document_ids"][at: at + size] == item["document_ids"][at]).all()
            pieces.append({k: item[k][at: at + size] for k in ("input_ids", "labels")})
    assert len(pieces) == len(unpacked)
    for piece, i in zip(pieces, range(len(unpacked))):
        alone = unpacked[i]
        size = len(piece["input_ids"])
        assert alone["input_ids"][size - 1] == SEP and (alone["input_ids"][size:] == PAD).all()
        for key in ("input_ids", "labels"):
            assert torch.equal(piece[key], alone[key][:size]), (i, key)


# ------------------------------------------------------------ the models

def packed_batch(records: list[list[int]]) -> dict:
    ids = torch.tensor(sum((r + [SEP] for r in records), []) + [PAD] * 3)[None]
    documents, positions = document_layout(ids[0], SEP, PAD)
    return {"input_ids": ids, "document_ids": documents[None], "position_ids": positions[None],
            "attention_mask": (ids != PAD).long()}


def record_spans(records):
    spans, at = [], 0
    for r in records:
        spans.append((at, at + len(r)))
        at += len(r) + 1
    return spans


@pytest.mark.parametrize("kernel", ["segments", "mask"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_record_of_a_packed_window_computes_as_if_alone(name, kernel, monkeypatch):
    monkeypatch.setattr(Attention, "document_kernel", kernel)
    torch.manual_seed(0)
    model = build_model(tiny(name)).eval()
    rng = np.random.default_rng(1)
    records = [rng.choice(TOK.codon_ids, size=n).tolist() for n in (6, 9, 4, 7)]
    with torch.no_grad():
        packed = model(packed_batch(records))["logits"][0]
        for r, (start, end) in zip(records, record_spans(records)):
            # a record closed by its [SEP] (causal models never see it; BERT frames records so)
            alone = model({"input_ids": torch.tensor([r + [SEP]])})["logits"][0]
            torch.testing.assert_close(packed[start:end + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_record_sees_another(name):
    torch.manual_seed(0)
    model = build_model(tiny(name)).eval()
    records = [[10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34]]
    changed = [records[0], [40, 41, 42], records[2]]
    with torch.no_grad():
        a = model(packed_batch(records))["logits"][0]
        b = model(packed_batch(changed))["logits"][0]
    (s0, e0), (s1, e1), (s2, e2) = record_spans(records)
    assert torch.equal(a[s0:e0], b[s0:e0]) and torch.equal(a[s2:e2], b[s2:e2])
    assert not torch.allclose(a[s1:e1], b[s1:e1])


def test_rotary_takes_per_token_positions():
    for interleaved in (True, False):
        rotary = Rotary(8, interleaved=interleaved)
        q, k = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
        positions = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]])
        rq, rk = rotary(q, k, positions=positions)
        torch.testing.assert_close(rq[0, :, 3:], rotary(q[:1, :, 3:], k[:1, :, 3:])[0][0])
        torch.testing.assert_close(rk[1], rotary(q[1:], k[1:], offset=3)[1][0])


def test_document_kernels_agree_with_dropout_off_and_need_no_mask_for_segments():
    documents = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    assert document_runs(documents) == [[(0, 3), (3, 5)], [(0, 6)]]
    mask = document_mask(documents, causal=True)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False]
    assert mask[5].tolist() == [False] * 5 + [True]  # a token in no document sees itself only


# ------------------------------------------------------------ exactness: packed vs unpacked loss

@pytest.mark.parametrize("backend_kind", ["cpu", "csx"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_eval_loss_equals_unpacked(shards, tmp_path, name, backend_kind):
    losses = {}
    for kind in ("unpacked", "packed"):
        params = params_for(shards[kind], name, kind == "packed", tmp_path)
        torch.manual_seed(0)
        model = build_model(params.model)
        backend = ResidentBackend("cpu") if backend_kind == "cpu" else CSXBackend(params)
        backend.setup(model, None)
        try:
            losses[kind] = eval_loss(backend, params)
        finally:
            getattr(backend, "close", lambda: None)()
    (packed, n_packed), (unpacked, n_unpacked) = losses["packed"], losses["unpacked"]
    assert n_packed == n_unpacked > 0  # the same targets
    assert math.isclose(packed, unpacked, abs_tol=1e-5), (packed, unpacked)


@pytest.mark.parametrize("backend_kind", ["cpu", "csx"])
def test_one_training_step_on_the_whole_set_is_the_same_packed(shards, tmp_path, backend_kind):
    """The whole set as one batch: the same loss and gradient (norm) packed or not, so packing
    changes what a step costs, not what it learns."""
    from modelzoo.trainer import split_micro_batches
    results = {}
    for kind in ("unpacked", "packed"):
        data_dir = shards[kind]
        rows = len(ShardSet(data_dir))
        params = validate_params({
            "train_input": {"data_dir": str(data_dir), "batch_size": rows, "max_seq_length": L,
                            "pack_sequences": kind == "packed", "shuffle": False},
            "model": tiny("gpt_neox").model_dump(exclude_none=True),
            "optimizer": {"learning_rate": 1e-3},
            "runconfig": {"model_dir": str(tmp_path / kind), "max_steps": 1}})
        torch.manual_seed(0)
        backend = ResidentBackend("cpu") if backend_kind == "cpu" else CSXBackend(params)
        backend.setup(build_model(params.model), params.optimizer)
        cls, kwargs = dataset_for(params.model, params.train_input, 0)
        loader = build_dataloader(data_dir, rows, shuffle=False, shuffle_seed=0, dataset_cls=cls,
                                  dataset_kwargs=kwargs)
        try:
            results[kind] = backend.train_step(split_micro_batches(next(iter(loader)), 1), 1e-3)
        finally:
            getattr(backend, "close", lambda: None)()
    for key in ("loss", "grad_norm"):
        assert math.isclose(results["packed"][key], results["unpacked"][key], rel_tol=1e-5), key


def test_training_and_eval_on_packed_shards_log_nonpad_tokens_per_sec(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import yaml
    from modelzoo.cli import main
    model_dir = tmp_path / "md"
    raw = {"train_input": {"data_dir": str(shards["packed"]), "batch_size": 2, "max_seq_length": L,
                           "pack_sequences": True},
           "eval_input": {"data_dir": str(shards["packed"]), "batch_size": 2, "max_seq_length": L,
                          "pack_sequences": True},
           "model": tiny("gptj").model_dump(exclude_none=True),
           "optimizer": {"learning_rate": 1e-3},
           "runconfig": {"mode": "train_and_eval", "model_dir": str(model_dir), "max_steps": 2, "log_steps": 1}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    assert main(["CPU", "--params", str(tmp_path / "p.yaml")]) == 0
    log = (model_dir / "run.log").read_text()
    assert "non-pad tokens/s" in log and "eval at step 2" in log
    acc = EventAccumulator(str(model_dir / "train"))
    acc.Reload()
    nonpad = {e.step: e.value for e in acc.Scalars("nonpad_tokens_per_sec")}
    positions = {e.step: e.value for e in acc.Scalars("tokens_per_sec")}
    assert sorted(nonpad) == [1, 2] and all(0 < nonpad[s] <= positions[s] for s in nonpad)


def test_prepare_on_first_use_packs_and_never_reuses_a_dir_prepared_the_other_way(shards, tmp_path):
    from data_preparation.first_use import check_prepared, options_for
    from data_preparation.prepare_genomes import parse_args
    from modelzoo.errors import DataError
    root = REPO
    params = load_params(root / "configs" / "genslm" / "neox_25M_genes_packed_msl2048.yaml", check_paths=False)
    options = options_for(params.train_input)
    assert options.pack_sequences and options.rename_duplicate_ids
    assert parse_args(options.argv()) == options  # the command printed is the preparation done
    unpacked = params.train_input.model_copy(update={"data_dir": str(shards["unpacked"])})
    with pytest.raises(DataError) as e:
        check_prepared("train_input", unpacked)
    assert str(shards["unpacked"]) in str(e.value) and "pack_sequences" in str(e.value)
    check_prepared("train_input", params.train_input.model_copy(update={"data_dir": str(shards["packed"])}))


def test_genslm_recipe_presets_pack_genes_then_fine_tune_on_genomes():
    root = REPO / "configs" / "genslm"
    genes = load_params(root / "neox_25M_genes_packed_msl2048.yaml", check_paths=False)
    genomes = load_params(root / "neox_25M_sarscov2_finetune_msl10240.yaml", check_paths=False)
    assert genes.train_input.pack_sequences and genes.eval_input.pack_sequences
    assert "packed" in genes.train_input.data_dir  # never the unpacked presets' directories
    assert genomes.train_input.max_seq_length == 10240 and genomes.runconfig.checkpoint_states == {"model"}
    same = genes.model.model_dump(exclude={"max_position_embeddings"})
    assert genomes.model.model_dump(exclude={"max_position_embeddings"}) == same


def test_a_batch_s_documents_are_read_once_not_per_layer(monkeypatch):
    import modelzoo.models.layers as layers
    calls, real = [], layers.document_runs
    monkeypatch.setattr(layers, "document_runs", lambda documents: calls.append(1) or real(documents))
    model = build_model(tiny("gpt_neox"))
    batch = packed_batch([[10, 11, 12], [20, 21]])
    model(batch)
    assert len(calls) == 1
    batch["document_ids"] += 0  # changed in place: read again
    model(batch)
    assert len(calls) == 2
