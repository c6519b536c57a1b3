"""prepare_genomes at scale: bounded memory, the same bytes on any number of workers, packed windows."""

import gzip
import json
import os
import weakref
from pathlib import Path

import numpy as np
import pytest

from data_preparation import pipeline, windows
from data_preparation.prepare_genomes import main
from modelzoo.data.sequences import read_records
from modelzoo.data.shards import ShardSet, ShardWriter
from modelzoo.data.tokenizer import CodonTokenizer
from tests.helpers import DATA

TOK = CodonTokenizer()
BASES = np.frombuffer(b"ACGT", dtype=np.uint8)


def write_fasta(path: Path, lengths, seed: int = 0, prefix: str = "g", extra: str = "") -> dict[str, str]:
    """Random genes of the given codon counts, 60 nt a line; returns id -> sequence."""
    rng = np.random.default_rng(seed)
    records = {}
    for i, n in enumerate(lengths):
        records[f"{prefix}{i}"] = BASES[rng.integers(0, 4, 3 * int(n))].tobytes().decode()
    text = "".join(f">{k} some description\n" + "\n".join(v[j:j + 60] for j in range(0, len(v), 60)) + "\n"
                   for k, v in records.items())
    path.write_text(text + extra)
    return records


def run(*args) -> None:
    assert main([str(a) for a in args]) == 0


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def manifest(out: Path, split: str = "train") -> dict:
    """A split's manifest, its records listed as format version 1 did (from the record table)."""
    return {**json.loads((out / split / "manifest.json").read_text()),
            "records": list(ShardSet(out / split).records.entries())}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few kB and groups of 64 records: a few thousand genes make many of each."""
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(windows, "GROUP_RECORDS", 64)
    monkeypatch.setattr(windows, "PIECE_CODONS", 2000)


def test_memory_does_not_grow_with_the_input(tmp_path, small_chunks, monkeypatch):
    """Records are written while the input is still being read, and what is held at any time
    (tokenised chunks alive + the group being gathered) stays far below the input's records."""
    n = 3000
    fasta = tmp_path / "genes.fa"
    write_fasta(fasta, np.random.default_rng(1).integers(20, 120, n))
    live = []  # weak references to every chunk tokenised
    tokenised = []
    tokenise = pipeline.tokenise

    def tracked(task):
        chunk = tokenise(task)
        live.append(weakref.ref(chunk))
        tokenised.append(len(chunk.ids))
        return chunk

    groups = []
    init = windows.Groups.__init__

    def tracked_init(self):
        init(self)
        groups.append(self)

    held, first_write = [], []
    add_rows = ShardWriter.add_rows

    def sampled(self, rows, num_tokens=None):
        chunks = [ref() for ref in live]
        held.append(sum(len(c.ids) for c in chunks if c is not None) + sum(g.records for g in groups))
        first_write.append(sum(tokenised))
        return add_rows(self, rows, num_tokens)

    monkeypatch.setattr(pipeline, "tokenise", tracked)
    monkeypatch.setattr(windows.Groups, "__init__", tracked_init)
    monkeypatch.setattr(ShardWriter, "add_rows", sampled)
    run("--input", fasta, "--output_dir", tmp_path / "out", "--max_seq_length", 64, "--num_workers", 1)
    assert sum(tokenised) == n and len(tokenised) > 50
    assert first_write[0] < n // 10  # the first windows were written after a tenth of the input
    assert max(held) < 300  # never more than a few chunks and one group of records
    kept = sum(manifest(tmp_path / "out", s)["records"].__len__() for s in ("train", "val", "test"))
    assert kept == n


def test_same_bytes_on_any_number_of_workers_and_chunk_size(tmp_path, monkeypatch):
    lengths = np.random.default_rng(2).integers(9, 400, 1500)
    lengths[[5, 700]] = [1500, 2049]  # records longer than a window
    fasta = tmp_path / "genes.fa"
    write_fasta(fasta, lengths, extra=">allN\n" + "N" * 300 + "\n>g5\nATGATGATGATGATGATGATGATGATGATG\n")
    other = tmp_path / "more.fa.gz"
    other.write_bytes(gzip.compress(fasta.read_bytes().replace(b">g", b">h").replace(b">allN", b">moreN")))
    monkeypatch.setattr(windows, "GROUP_RECORDS", 500)
    for pack in ([], ["--pack_sequences"]):
        outputs, first = [], tmp_path / f"out{len(pack)}_1_{1 << 24}"
        for workers, chunk in ((1, 1 << 24), (1, 5000), (2, 5000), (3, 20000)):
            monkeypatch.setattr(pipeline, "CHUNK_BYTES", chunk)
            out = tmp_path / f"out{len(pack)}_{workers}_{chunk}"
            run("--input", fasta, other, "--output_dir", out, "--max_seq_length", 256, "--split", "0.8,0.1,0.1",
                "--rename_duplicate_ids", "--num_workers", workers, *pack)
            outputs.append(tree_bytes(out))
        assert all(o == outputs[0] for o in outputs[1:])
        m = json.loads(outputs[0]["train/manifest.json"])
        assert m.get("packed", False) == bool(pack)
        assert "g5#2" in [r["id"] for s in ("train", "val", "test")
                          for r in manifest(first, s)["records"]]


def test_split_is_exact_and_in_input_order(tmp_path, monkeypatch):
    """One group: the split of a single permutation of every record (as before groups); many
    groups: still exactly round(fraction x records) each, and input order within each split."""
    fasta = tmp_path / "genes.fa"
    write_fasta(fasta, np.full(1000, 30))
    run("--input", fasta, "--output_dir", tmp_path / "one", "--max_seq_length", 64, "--seed", 7)
    order = np.random.default_rng(7).permutation(1000)
    expected = {"train": np.sort(order[:900]), "val": np.sort(order[900:950]), "test": np.sort(order[950:])}
    for split, members in expected.items():
        assert [r["id"] for r in manifest(tmp_path / "one", split)["records"]] == [f"g{i}" for i in members]

    monkeypatch.setattr(windows, "GROUP_RECORDS", 37)
    run("--input", fasta, "--output_dir", tmp_path / "many", "--max_seq_length", 64, "--seed", 7,
        "--split", "0.7,0.2,0.1")
    ids = {s: [int(r["id"][1:]) for r in manifest(tmp_path / "many", s)["records"]] for s in expected}
    assert [len(v) for v in ids.values()] == [700, 200, 100]
    assert all(v == sorted(v) for v in ids.values())
    assert sorted(sum(ids.values(), [])) == list(range(1000))
    assert manifest(tmp_path / "many")["created_by"]["options"]["split_method"]["group_records"] == 37


def packed_rows(out: Path, split: str = "train"):
    shards = ShardSet(out / split)
    return shards, np.stack([shards[i] for i in range(len(shards))])


def test_packed_windows(tmp_path, small_chunks):
    L = 64
    lengths = np.random.default_rng(3).integers(8, 40, 400)
    lengths[[10, 11, 50, 51, 52, 200]] = [L - 1, L, 200, 9, L + 3, 130]  # fits exactly; long ones
    fasta = tmp_path / "genes.fa"
    records = write_fasta(fasta, lengths)
    out = tmp_path / "out"
    run("--input", fasta, "--output_dir", out, "--max_seq_length", L, "--split", "1,0,0", "--pack_sequences",
        "--min_codons", 8)
    shards, rows = packed_rows(out)
    m = shards.manifest
    assert m["packed"] is True and m["num_windows"] == len(rows)
    entries = list(shards.records.entries())
    assert [e["id"] for e in entries] == list(records)  # input order
    sep, pad = TOK.sep_id, TOK.pad_id
    fits = [e for e in entries if e["num_tokens"] + 1 <= L]
    assert int((rows == sep).sum()) == len(fits)  # one [SEP] per record in a packed window
    assert m["num_tokens"] == int((rows != pad).sum()) == sum(e["num_tokens"] for e in entries) + len(fits)
    last_row = -1
    for e in entries:
        codons = TOK.encode(records[e["id"]])
        row, off, n = e["window"], e["offset"], e["num_tokens"]
        assert row >= last_row  # windows follow input order
        if n + 1 <= L:  # whole in one window, followed by its [SEP]
            assert e["num_windows"] == 1 and off + n + 1 <= L
            assert np.array_equal(rows[row, off:off + n], codons) and rows[row, off + n] == sep
        else:  # windows of its own, no [SEP], cut as unpacked: a tail shorter than min_codons dropped
            k = e["num_windows"]
            tail = len(codons) % L
            assert off == 0 and n == (len(codons) - tail if 0 < tail < 8 else len(codons)) and k == -(-n // L)
            stream = rows[row:row + k].reshape(-1)
            assert sep not in stream
            assert np.array_equal(stream[:n], codons[:n]) and (stream[n:] == pad).all()
            following = entries[entries.index(e) + 1:]
            assert not following or following[0]["window"] == row + k  # the next record opens a window
        last_row = row
    # concatenating the records back from the windows reproduces the tokenised records
    back = {}
    for e in entries:
        flat = rows[e["window"]:].reshape(-1)[e["offset"]:]
        back[e["id"]] = flat[:e["num_tokens"]]
    assert all(np.array_equal(back[k], TOK.encode(v)[:len(back[k])]) for k, v in records.items())
    # a window holds whole records back to back, [SEP] after each, then [PAD] only
    for r in rows:
        if sep in r:
            nonpad = r[r != pad]
            assert nonpad[-1] == sep and (r[len(nonpad):] == pad).all()


def test_packed_fill_is_greedy_and_exact(tmp_path):
    """Lengths chosen by hand: 30+1 and 32+1 fill 64 exactly; 40 opens a new window; 63 codons
    (64 with [SEP]) fit alone; 64 codons is too long and gets its own window without [SEP]."""
    L = 64
    fasta = tmp_path / "hand.fa"
    records = write_fasta(fasta, [30, 32, 40, 10, 63, 64, 8])
    run("--input", fasta, "--output_dir", tmp_path / "out", "--max_seq_length", L, "--split", "1,0,0",
        "--pack_sequences")
    shards, rows = packed_rows(tmp_path / "out")
    places = [(e["window"], e["offset"], e["num_windows"]) for e in shards.records.entries()]
    assert places == [(0, 0, 1), (0, 31, 1), (1, 0, 1), (1, 41, 1), (2, 0, 1), (3, 0, 1), (4, 0, 1)]
    assert len(rows) == 5 and (rows[0] != TOK.pad_id).all() and rows[0, -1] == TOK.sep_id
    assert rows[1, 40] == rows[1, 51] == TOK.sep_id and (rows[1, 52:] == TOK.pad_id).all()
    assert rows[2, 63] == TOK.sep_id and TOK.sep_id not in rows[3]
    assert np.array_equal(rows[3], TOK.encode(records["g5"]))
    unpacked = tmp_path / "unpacked"
    run("--input", fasta, "--output_dir", unpacked, "--max_seq_length", L, "--split", "1,0,0")
    m = manifest(unpacked)
    assert "packed" not in m and set(m["records"][0]) == {"id", "num_windows", "num_tokens"}


def test_shard_files_are_what_np_save_writes(tmp_path):
    fasta = tmp_path / "genes.fa"
    write_fasta(fasta, np.full(50, 105))  # 4 windows each, the last holding 9 codons
    run("--input", fasta, "--output_dir", tmp_path / "out", "--max_seq_length", 32, "--split", "1,0,0",
        "--windows_per_file", 64)
    files = sorted((tmp_path / "out" / "train").glob("tokens_*.npy"))
    assert len(files) == 4  # 200 windows: 64, 64, 64, 8
    for f in files + [tmp_path / "out" / "train" / "records.npy"]:
        again = tmp_path / "again.npy"
        np.save(again, np.load(f))
        assert again.read_bytes() == f.read_bytes()
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == \
        ["manifest.json", "record_ids.bin", "records.npy"] + [f.name for f in files]


def test_repeated_ids_across_chunks_and_files(tmp_path, small_chunks, capsys):
    fasta = tmp_path / "genes.fa"
    records = write_fasta(fasta, np.full(300, 50), extra=">g3\nATGATGATGATGATGATGATGATGATGATG\n"
                          ">g3\nATGATGATGATGATGATGATGATGATGATG\n")
    out = tmp_path / "out"
    assert main(["--input", str(fasta), "--output_dir", str(out), "--max_seq_length", "64"]) == 2
    assert "duplicate record id 'g3'" in capsys.readouterr().err
    run("--input", fasta, "--output_dir", out, "--max_seq_length", 64, "--split", "1,0,0",
        "--rename_duplicate_ids")
    ids = [r["id"] for r in manifest(out)["records"]]
    assert ids == list(records) + ["g3#2", "g3#3"]
    taken = tmp_path / "taken.fa"
    taken.write_text(">a\nATGATGATGATGATGATGATGATGATGATG\n>a\nATGATGATGATGATGATGATGATGATGATG\n"
                     ">a#2\nATGATGATGATGATGATGATGATGATGATG\n")
    assert main(["--input", str(taken), "--output_dir", str(tmp_path / "t"), "--max_seq_length", "64",
                 "--rename_duplicate_ids"]) == 2
    assert "'a#2', its new name, is taken" in capsys.readouterr().err
    copy = tmp_path / "copy.fa"
    copy.write_text(">new\nATGATGATGATGATGATGATGATGATGATG\n>g299\nATGATGATGATGATGATGATGATGATGATG\n")
    assert main(["--input", str(fasta), str(copy), "--output_dir", str(tmp_path / "x"), "--max_seq_length", "64",
                 "--rename_duplicate_ids"]) == 2
    assert f"record id 'g299' already used in {fasta}" in capsys.readouterr().err


@pytest.mark.parametrize("max_run", [1 << 24, 1500])
def test_seen_ids_match_a_set(monkeypatch, max_run):
    monkeypatch.setattr(pipeline, "MAX_RUN", max_run)
    rng = np.random.default_rng(4)
    seen, reference = pipeline.SeenIds(1), {}
    for _ in range(30):
        ids = [f"id{x}" for x in rng.integers(0, 5000, 700)]
        repeats = seen.add(pipeline.id_hashes(ids), 0)
        expected = []
        for pos, rec_id in enumerate(ids):
            reference[rec_id] = reference.get(rec_id, 0) + 1
            if reference[rec_id] > 1:
                expected.append((pos, 0, reference[rec_id]))
        assert repeats == expected
    assert len(seen) == len(reference)
    assert len(seen._runs) <= 12  # merged as it grows...
    assert all(len(h) <= max(max_run, 700) for h, _ in seen._runs)  # ...up to MAX_RUN
    assert all((h[1:] > h[:-1]).all() for h, _ in seen._runs)


def test_records_read_back_unchanged_through_genbank_and_fasta(tmp_path, monkeypatch):
    """GenBank chunks (parsed by Biopython in the main process) and FASTA chunks (parsed by
    workers) give the same codons as read_records."""
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 2000)
    gb = DATA / "ypestis_pPCP1_NC_005816.gb"
    out = tmp_path / "out"
    run("--input", gb, "--features", "CDS", "--output_dir", out, "--max_seq_length", 128, "--split", "1,0,0",
        "--num_workers", 2, "--pack_sequences")
    shards, rows = packed_rows(out)
    expected = {r.id: TOK.encode(r.seq) for r in read_records(gb, features="CDS")}
    got = {e["id"]: rows[e["window"]:].reshape(-1)[e["offset"]:e["offset"] + e["num_tokens"]]
           for e in shards.records.entries()}
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], v[:len(got[k])]) for k, v in expected.items())


def _dies(task):
    os._exit(1)  # a worker killed mid-task (e.g. by the out-of-memory killer)


def test_a_dead_worker_is_one_line_and_leaves_nothing(tmp_path, small_chunks, monkeypatch, capsys):
    fasta = tmp_path / "genes.fa"
    write_fasta(fasta, np.full(300, 50))
    monkeypatch.setattr(pipeline, "tokenise", _dies)
    out = tmp_path / "out"
    assert main(["--input", str(fasta), "--output_dir", str(out), "--max_seq_length", "64", "--num_workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "worker process died" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genes.fa"]
