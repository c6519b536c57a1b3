import json

import numpy as np
import pytest
import torch

from modelzoo.data.datasets import CausalLMDataset, ResumableBatchSampler, build_dataloader
from modelzoo.data.shards import ShardSet, ShardWriter
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import ConfigError, DataError

L = 16


@pytest.fixture(scope="module")
def tok():
    return CodonTokenizer()


def make_windows(n, fill_to=L, start=0):
    """n rows whose tokens encode (row number) so tests can recognise them; right-padded."""
    rows = np.full((n, L), 3, dtype=np.uint8)
    for i in range(n):
        rows[i, :fill_to] = 5 + (start + i + np.arange(fill_to)) % 64
    return rows


@pytest.fixture
def shard_dir(tmp_path, tok):
    out = tmp_path / "train"
    with ShardWriter(out, L, tok, windows_per_file=7, command="test", options={"k": 1}) as w:
        w.add("rec_a", make_windows(10, start=0))
        w.add("rec_b", make_windows(13, fill_to=9, start=10))
    return out


def test_write_and_read(shard_dir, tok):
    m = json.loads((shard_dir / "manifest.json").read_text())
    assert m["num_windows"] == 23 and m["max_seq_length"] == L
    assert m["num_tokens"] == 10 * L + 13 * 9
    assert m["format_version"] == 2 and m["num_records"] == 2
    assert m["records"]["columns"] == ["id_end", "num_windows", "num_tokens"]
    assert m["records"]["table"]["shape"] == [2, 3] and m["records"]["ids"]["bytes"] == 10
    assert (shard_dir / "record_ids.bin").read_bytes() == b"rec_arec_b"
    assert np.load(shard_dir / "records.npy").tolist() == [[5, 10, 160], [10, 13, 117]]
    assert [f["shape"] for f in m["files"]] == [[7, L], [7, L], [7, L], [2, L]]
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["created_by"]["options"] == {"k": 1}
    assert not [p for p in shard_dir.parent.iterdir() if p.name.startswith(".")]  # no temp left

    shards = ShardSet(shard_dir)
    assert len(shards) == 23 and shards.max_seq_length == L
    assert shards.manifest == {k: v for k, v in m.items() if k != "records"}  # the table is apart
    assert list(shards.records.entries()) == [{"id": "rec_a", "num_windows": 10, "num_tokens": 160},
                                              {"id": "rec_b", "num_windows": 13, "num_tokens": 117}]
    assert shards.record_ids == ["rec_a", "rec_b"] and shards.records.id(1) == "rec_b"
    expected = np.concatenate([make_windows(10), make_windows(13, fill_to=9, start=10)])
    assert np.array_equal(np.stack([shards[i] for i in range(23)]), expected)
    assert np.array_equal(shards[-1], expected[-1])
    with pytest.raises(IndexError):
        shards[23]


def test_writer_is_atomic(tmp_path, tok):
    out = tmp_path / "split"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, L, tok) as w:
            w.add("a", make_windows(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        with ShardWriter(out, L, tok) as w:
            w.add("a", np.zeros((2, L + 1), np.uint8))
    assert list(tmp_path.iterdir()) == []
    with ShardWriter(out, L, tok) as w:
        w.add("a", make_windows(2))
    with pytest.raises(DataError, match="already exists"):
        ShardWriter(out, L, tok)


def test_shardset_validation(shard_dir, tmp_path):
    def error(path, **kw):
        with pytest.raises(DataError) as info:
            ShardSet(path, **kw)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "not found" in error(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    assert "no manifest.json" in error(tmp_path / "plain")

    manifest = shard_dir / "manifest.json"
    good = manifest.read_text()
    manifest.write_text("{not json")
    assert "invalid JSON" in error(shard_dir)
    m = json.loads(good)
    m["tokenizer"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(m))
    assert "another tokenizer" in error(shard_dir)
    m = json.loads(good)
    m["files"][0]["shape"] = [8, L]
    manifest.write_text(json.dumps(m))
    assert "tokens_00000.npy" in error(shard_dir)
    manifest.write_text(good)

    npy = shard_dir / "tokens_00001.npy"
    data = bytearray(npy.read_bytes())
    data[-1] ^= 1
    npy.write_bytes(bytes(data))
    assert "checksum" in error(shard_dir) and "tokens_00001.npy" in error(shard_dir)
    assert len(ShardSet(shard_dir, verify=False)) == 23
    npy.unlink()
    assert "missing" in error(shard_dir, verify=False)


def test_record_table_is_checked_as_the_token_files(shard_dir):
    """The side files are covered by the manifest's checksums, shapes and sizes."""
    def error(**kw):
        with pytest.raises(DataError) as info:
            ShardSet(shard_dir, **kw)
        assert "\n" not in str(info.value)
        return str(info.value)

    ids = shard_dir / "record_ids.bin"
    ids.write_bytes(b"rec_arec_c")
    assert "checksum" in error() and "record_ids.bin" in error()
    assert ShardSet(shard_dir, verify=False).record_ids == ["rec_a", "rec_c"]  # unverified: read as is
    ids.write_bytes(b"rec_arec_bb")
    assert "11 id bytes" in error(verify=False)
    table = shard_dir / "records.npy"
    table.unlink()
    assert "records.npy: listed in manifest.json but missing" in error(verify=False)
    manifest = shard_dir / "manifest.json"
    m = json.loads(manifest.read_text())
    m["records"]["columns"] = ["id_end", "num_windows"]
    manifest.write_text(json.dumps(m))
    assert "of shape [2, 3]" in error(verify=False)


def as_version_1(shard_dir):
    """Rewrite a shard directory as format version 1 wrote it: the records listed in the manifest."""
    shards = ShardSet(shard_dir)
    entries = list(shards.records.entries())
    manifest = shard_dir / "manifest.json"
    m = json.loads(manifest.read_text())
    m["format_version"], m["records"] = 1, entries
    del m["num_records"]
    manifest.write_text(json.dumps(m))
    for name in ("records.npy", "record_ids.bin"):
        (shard_dir / name).unlink()
    return entries


def packed_shards(out, tok):
    """Three records in packed windows: two sharing row 0, one long one over rows 1-2."""
    rows = make_windows(3)
    with ShardWriter(out, L, tok, packed=True, command="test") as w:
        w.add_records(["p", "q\u00e9", "r"], [1, 1, 2], [6, 8, 30], window=[0, 0, 1], offset=[0, 7, 0])
        w.add_rows(rows)
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_shards_of_format_version_1_read_as_before(shard_dir, tmp_path, tok, packed):
    """Shards written before the record table still open, with the same records, windows, framed
    BERT pieces and labels (read from the manifest's list)."""
    from modelzoo.data.datasets import FramedWindows, SequenceClassificationDataset
    directory = packed_shards(tmp_path / "packed", tok) if packed else shard_dir
    new = ShardSet(directory)
    framed = FramedWindows(new, packed=packed)
    labels = tmp_path / "labels.tsv"
    labels.write_text("id\tclass\n" + "".join(f"{r}\t{k % 2}\n" for k, r in enumerate(new.record_ids)))
    classify = (lambda s: None) if packed else (lambda s: SequenceClassificationDataset(s, labels, "class").record_labels)
    classes = classify(new)
    entries = as_version_1(directory)
    assert "window" in entries[0] if packed else "window" not in entries[0]
    old = ShardSet(directory)
    assert list(old.records.entries()) == entries and old.record_ids == new.record_ids
    assert np.array_equal(np.stack([old[i] for i in range(len(old))]), np.stack([new[i] for i in range(len(new))]))
    assert np.array_equal(FramedWindows(old, packed=packed).pieces, framed.pieces)
    assert np.array_equal(classify(old), classes)
    assert "records" not in old.manifest and old.manifest["format_version"] == 1


def test_an_unknown_format_version_is_refused_in_one_line(shard_dir):
    manifest = shard_dir / "manifest.json"
    m = json.loads(manifest.read_text())
    m["format_version"] = 3
    manifest.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"v3, this code reads 'codon-token-shards' v1 and v2 \(prepare the "
                                        r"shards again with python -m data_preparation.prepare_genomes\)$"):
        ShardSet(shard_dir)


def test_opening_many_records_builds_no_object_per_record(tmp_path, tok):
    """200,000 records: the manifest stays small, and opening the set allocates a few kilobytes,
    not the records' table (format version 1 parsed a JSON list of them at every start)."""
    import tracemalloc
    n = 200_000
    ids = [f"gene_{i:06d}" for i in range(n)]
    with ShardWriter(tmp_path / "many", 4, tok, windows_per_file=1 << 18) as w:
        w.add_many(ids, np.ones(n, np.int64), np.full((n, 4), 5, np.uint8))
    assert (tmp_path / "many" / "manifest.json").stat().st_size < 2048
    tracemalloc.start()
    try:
        shards = ShardSet(tmp_path / "many", verify=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    json_bytes = n * len('{"id": "gene_000000", "num_windows": 1, "num_tokens": 4}, ')
    assert peak < 256 * 1024 < json_bytes // 40, peak
    assert len(shards.records) == n and shards.records.id(n - 1) == ids[-1]
    assert int(shards.records.num_windows.sum()) == n


def test_causal_lm_labels_are_shifted(shard_dir):
    ds = CausalLMDataset(ShardSet(shard_dir))
    item = ds[12]  # a padded row: 9 tokens then 7 pads
    ids, labels, mask = item["input_ids"], item["labels"], item["attention_mask"]
    assert ids.dtype == labels.dtype == mask.dtype == torch.int64 and ids.shape == (L,)
    assert torch.equal(labels[:8], ids[1:9])
    assert (labels[8:] == -100).all()  # targets that are [PAD], and the last position
    assert mask.tolist() == [1] * 9 + [0] * 7
    full = ds[0]
    assert torch.equal(full["labels"][:-1], full["input_ids"][1:]) and full["labels"][-1] == -100


def epoch_batches(sampler):
    return [b for b in sampler]


def test_sampler_determinism_and_epochs():
    a = ResumableBatchSampler(23, 4, shuffle=True, seed=7)
    b = ResumableBatchSampler(23, 4, shuffle=True, seed=7)
    e0, e1 = epoch_batches(a), epoch_batches(a)
    assert e0 == epoch_batches(b) and e0 != e1 and len(e0) == len(a) == 5  # drop_last
    assert all(len(x) == 4 for x in e0) and len(set(sum(e0, []))) == 20
    assert epoch_batches(ResumableBatchSampler(23, 4, shuffle=True, seed=8)) != e0
    plain = epoch_batches(ResumableBatchSampler(23, 4, shuffle=False, seed=0))
    assert plain[0] == [0, 1, 2, 3] and plain[-1] == [16, 17, 18, 19]


def test_sampler_resume_mid_epoch():
    ref = ResumableBatchSampler(40, 4, shuffle=True, seed=1)
    full = epoch_batches(ref) + epoch_batches(ref)
    run = ResumableBatchSampler(40, 4, shuffle=True, seed=1)
    it = iter(run)
    seen = [next(it) for _ in range(3)]
    state = run.state_dict()
    assert state == {"epoch": 0, "batches_done": 3}
    resumed = ResumableBatchSampler(40, 4, shuffle=True, seed=1)
    resumed.load_state_dict(state)
    assert seen + epoch_batches(resumed) + epoch_batches(resumed) == full


def test_sampler_ranks_partition_global_batch():
    single = epoch_batches(ResumableBatchSampler(30, 6, shuffle=True, seed=3))
    r0 = epoch_batches(ResumableBatchSampler(30, 6, shuffle=True, seed=3, rank=0, world_size=2))
    r1 = epoch_batches(ResumableBatchSampler(30, 6, shuffle=True, seed=3, rank=1, world_size=2))
    assert [x + y for x, y in zip(r0, r1)] == single
    with pytest.raises(ConfigError, match="divisible"):
        ResumableBatchSampler(30, 6, shuffle=True, seed=3, rank=0, world_size=4)
    with pytest.raises(ConfigError, match="larger than"):
        ResumableBatchSampler(3, 6, shuffle=True, seed=3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_resume_counts_consumed_batches(shard_dir, num_workers):
    def loader():
        return build_dataloader(shard_dir, batch_size=4, shuffle=True, shuffle_seed=11,
                                num_workers=num_workers, max_seq_length=L)

    ref = loader()
    assert ref.num_batches_per_epoch == 5 and ref.tokens_per_batch == 4 * L
    it = iter(ref)
    expected = [next(it)["input_ids"] for _ in range(13)]  # crosses two epoch boundaries

    first = loader()
    it = iter(first)
    for _ in range(7):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 1, "batches_done": 2}  # consumed, not what workers prefetched
    second = loader()
    second.load_state_dict(state)
    it = iter(second)
    rest = [next(it)["input_ids"] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(rest, expected[7:]))


def test_dataloader_config_errors(shard_dir):
    with pytest.raises(ConfigError, match="max_seq_length 32.*max_seq_length 16"):
        build_dataloader(shard_dir, 4, True, 0, 0, max_seq_length=32)
    with pytest.raises(ConfigError, match="divisible"):
        build_dataloader(shard_dir, 3, True, 0, 0, rank=0, world_size=2)
    ranks = [build_dataloader(shard_dir, 4, True, 5, 0, rank=r, world_size=2) for r in range(2)]
    whole = build_dataloader(shard_dir, 4, True, 5, 0)
    b0, b1, b = (next(iter(x))["input_ids"] for x in (*ranks, whole))
    assert b0.shape == (2, L) and torch.equal(torch.cat([b0, b1]), b)


def test_unk_is_input_but_never_a_target(tmp_path, tok):
    rows = make_windows(1)
    rows[0, 4] = tok.unk_id
    with ShardWriter(tmp_path / "u", L, tok, windows_per_file=7, command="test", options={}) as w:
        w.add("rec", rows)
    item = CausalLMDataset(ShardSet(tmp_path / "u"))[0]
    assert item["input_ids"][4] == tok.unk_id and item["labels"][3] == -100
    assert (item["labels"][:-1] != -100).sum() == L - 2


@pytest.mark.parametrize("world", [1, 2])
def test_eval_loader_covers_every_window_once(shard_dir, world):
    """pad_last: the whole set in fixed-shape batches; filler rows carry no label."""
    seen, labelled = [], 0
    for rank in range(world):
        loader = build_dataloader(shard_dir, batch_size=6, shuffle=False, shuffle_seed=0, rank=rank,
                                  world_size=world, pad_last=True)
        assert loader.num_batches_per_epoch == 4  # 23 windows
        batches = iter(loader)
        for _ in range(loader.num_batches_per_epoch):
            batch = next(batches)
            assert batch["input_ids"].shape == (6 // world, L)
            real = (batch["labels"] != -100).any(dim=1)
            seen += [tuple(r) for r in batch["input_ids"][real].tolist()]
            labelled += int((batch["labels"] != -100).sum())
    dataset = CausalLMDataset(ShardSet(shard_dir))
    assert sorted(seen) == sorted(tuple(dataset[i]["input_ids"].tolist()) for i in range(23))
    assert labelled == sum(int((dataset[i]["labels"] != -100).sum()) for i in range(23))


def test_shard_writer_add_many_equals_add(tmp_path):
    tok = CodonTokenizer()
    rows = np.full((5, 8), tok.pad_id, dtype=np.uint8)
    for i, n in enumerate([8, 3, 8, 1, 5]):
        rows[i, :n] = 7 + i
    ids, counts = ["a", "empty", "b", "c"], [2, 0, 1, 2]
    from modelzoo.data.shards import ShardWriter
    with ShardWriter(tmp_path / "one", 8, tok, windows_per_file=3) as one:
        for rec_id, lo, hi in zip(ids, np.cumsum([0] + counts[:-1]), np.cumsum(counts)):
            one.add(rec_id, rows[lo:hi])
    with ShardWriter(tmp_path / "many", 8, tok, windows_per_file=3) as many:
        many.add_many(ids[:2], counts[:2], rows[:2])
        many.add_many(ids[2:], counts[2:], rows[2:])
    assert one.manifest == many.manifest
    from modelzoo.data.shards import ShardSet
    assert ShardSet(tmp_path / "many").records.num_tokens.tolist() == [11, 0, 8, 6]
    with pytest.raises(ValueError, match="does not cut"):
        many.add_many(["x"], [2], rows[:1])
