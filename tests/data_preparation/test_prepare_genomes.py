import gzip
import json
import shutil
from pathlib import Path

import numpy as np

from data_preparation import pipeline, windows
from data_preparation.prepare_genomes import main, windows_of
from modelzoo.data.datasets import build_dataloader
from modelzoo.data.sequences import read_records
from modelzoo.data.shards import ShardSet
from modelzoo.data.tokenizer import CodonTokenizer
from tests.helpers import DATA

FIRST3 = str(DATA / "nextstrain_example_first3.fasta.gz")
NRUNS = str(DATA / "multiclade_nruns_2.fasta")
REF_GB = str(DATA / "NC_045512.2.gb")
YPESTIS = str(DATA / "ypestis_pPCP1_NC_005816.gb")


def run(*args):
    return main([str(a) for a in args])


def manifests(out):
    """Each split's manifest, its records listed as format version 1 did (from the record table)."""
    return {p.parent.name: {**json.loads(p.read_text()), "records": list(ShardSet(p.parent).records.entries())}
            for p in sorted(Path(out).glob("*/manifest.json"))}


def test_genomes_to_shards(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--input", FIRST3, NRUNS, REF_GB, "--output_dir", out, "--max_seq_length", 1024,
               "--split", "0.6,0.2,0.2", "--seed", 3) == 0
    report = capsys.readouterr().out
    assert "records read: 6, kept: 5" in report
    assert "skipped 1: too many [UNK]" in report  # LR991190 is 69% N
    ms = manifests(out)
    assert set(ms) == {"train", "val", "test"}
    ids = [r["id"] for m in ms.values() for r in m["records"]]
    assert sorted(ids) == sorted(["Wuhan/Hu-1/2019", "Wuhan/WH01/2019", "Australia/VIC05/2020",
                                  "HG998420", "NC_045512.2"])  # each genome in exactly one split
    for m in ms.values():
        # a ~29.9 kb genome = ~9,960 codons = 10 windows of 1024, the last padded
        assert all(r["num_windows"] == 10 for r in m["records"])
        assert m["num_windows"] == 10 * len(m["records"])
        assert str(tmp_path) not in json.dumps(m)  # no absolute paths
    tok = CodonTokenizer()
    train = ShardSet(out / "train")
    first_id = train.record_ids[0]
    seq = {r.id: r.seq for f in (FIRST3, NRUNS, REF_GB) for r in read_records(f)}[first_id]
    assert np.array_equal(train[0], tok.encode(seq)[:1024])
    assert f"{ms['train']['num_tokens']} tokens" in report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_is_deterministic(tmp_path, monkeypatch):
    args = ["--input", YPESTIS, REF_GB, "--features", "CDS", "--max_seq_length", 64,
            "--split", "0.8,0.2,0", "--seed", 5]
    assert run(*args, "--output_dir", tmp_path / "a") == 0
    # windows cut a few records at a time, and records read a few at a time, change nothing
    monkeypatch.setattr(windows, "PIECE_CODONS", 500)
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 3000)
    assert run(*args, "--output_dir", tmp_path / "b") == 0
    a, b = manifests(tmp_path / "a"), manifests(tmp_path / "b")
    assert a == b and set(a) == {"train", "val"}  # a split with fraction 0 is omitted
    for split in a:
        for name in ("manifest.json", "tokens_00000.npy", "records.npy", "record_ids.bin"):
            assert (tmp_path / "a" / split / name).read_bytes() == (tmp_path / "b" / split / name).read_bytes()
    n_cds = sum(len(m["records"]) for m in a.values())
    assert n_cds == 22
    assert a["train"]["created_by"]["options"]["features"] == "CDS"
    # a different seed gives a different record split
    assert run(*args[:-1], 6, "--output_dir", tmp_path / "c") == 0
    assert manifests(tmp_path / "c")["val"]["records"] != a["val"]["records"]
    # the shards feed the dataloader directly
    loader = build_dataloader(tmp_path / "a" / "train", 4, True, 0, 0, max_seq_length=64)
    assert next(iter(loader))["input_ids"].shape == (4, 64)


def test_windows_and_skips(tmp_path, capsys):
    fasta = tmp_path / "mixed.fa"
    fasta.write_text(
        ">empty\n\n"
        ">short\nATGATG\n"
        ">allN\n" + "N" * 300 + "\n"
        ">lower\n" + "atgaaacccggg" * 10 + "\n"  # 40 codons
        ">rna\n" + "AUGAAACCCGGG" * 3 + "\n")  # 12 codons
    out = tmp_path / "out"
    assert run("--input", fasta, "--output_dir", out, "--max_seq_length", 16,
               "--split", "1,0,0", "--min_codons", 8) == 0
    report = capsys.readouterr().out
    assert "records read: 5, kept: 2" in report
    for reason in ("empty", "too short", "too many [UNK]"):
        assert f"skipped 1: {reason}" in report
    m = manifests(out)["train"]
    # 40 codons -> 16 + 16 + 8 (kept, padded); 12 codons -> one padded window
    assert [(r["id"], r["num_windows"], r["num_tokens"]) for r in m["records"]] == \
        [("lower", 3, 40), ("rna", 1, 12)]
    shards = ShardSet(out / "train")
    assert 0 not in np.asarray(shards[0])  # lowercase did not become [UNK]

    w = windows_of(np.arange(5, 5 + 37, dtype=np.uint8), 16, 8, pad_id=3)
    assert w.shape == (2, 16)  # the 5-codon tail is dropped
    assert windows_of(np.arange(5, 15, dtype=np.uint8), 16, 8, 3)[0, 10:].tolist() == [3] * 6


def error_of(capsys, *args):
    assert run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_errors_leave_nothing_behind(tmp_path, capsys):
    html = tmp_path / "download.fasta"
    html.write_text("<html><body>rate limited</body></html>")
    out = tmp_path / "out"
    common = ["--output_dir", out, "--max_seq_length", 32]
    assert "HTML" in error_of(capsys, "--input", FIRST3, html, *common)

    corrupt = tmp_path / "bad.fa.gz"
    corrupt.write_bytes(Path(FIRST3).read_bytes()[:4000])
    assert "gzip" in error_of(capsys, "--input", corrupt, *common)

    dup = tmp_path / "dup.fa"
    shutil.copy(REF_GB, tmp_path / "ref_copy.gb")
    assert "NC_045512.2" in error_of(capsys, "--input", REF_GB, tmp_path / "ref_copy.gb", *common)
    dup.write_text(">x\nATGATGATGATGATGATGATGATGATG\n>x\nATGATGATGATGATGATGATGATGATG\n")
    assert "duplicate" in error_of(capsys, "--input", dup, *common)

    assert "--split" in error_of(capsys, "--input", FIRST3, *common, "--split", "0.5,0.5")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fa.gz", "download.fasta",
                                                          "dup.fa", "ref_copy.gb"]

    assert run("--input", dup, *common, "--rename_duplicate_ids", "--split", "1,0,0") == 0
    assert "not empty" in error_of(capsys, "--input", FIRST3, *common)
    assert run("--input", FIRST3, *common, "--overwrite", "--split", "1,0,0") == 0
    assert len(ShardSet(out / "train").record_ids) == 3


def test_options_out_of_range_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    for option, value, said in [("--windows_per_file", 0, "--windows_per_file 0: need at least 1"),
                                ("--seed", -1, "--seed -1: need 0 to 4294967295"),
                                ("--seed", 2 ** 64, "--seed 18446744073709551616: need 0 to"),
                                ("--input", tmp_path / "missing.fa", "no such file"),
                                ("--split", "nan,0,1", "--split 'nan,0,1'"),
                                ("--split", "1.5,-0.5,0", "--split '1.5,-0.5,0'"),
                                ("--max_seq_length", 10 ** 11, "--max_seq_length 100000000000: need 1 to"),
                                ("--max_seq_length", "1e11", "invalid int value: '1e11'"),
                                ("--max_n_fraction", "nan", "--max_n_fraction nan: need a fraction in [0, 1]"),
                                ("--num_workers", 10 ** 6, "--num_workers 1000000: need 1 to"),
                                ("--min_codons", 0, "--min_codons 0: need at least 1")]:
        argv = ["--input", FIRST3, "--output_dir", out, "--max_seq_length", 32, option, value]
        try:
            err = error_of(capsys, *argv)
        except SystemExit as e:  # argparse's own refusal: one line, exit 2 too
            assert e.code == 2
            err = capsys.readouterr().err.strip()
        assert said in err and "\n" not in err, (option, err)
    assert list(tmp_path.iterdir()) == []


def test_crlf_gzip_input(tmp_path, capsys):
    with gzip.open(FIRST3, "rb") as fh:
        text = fh.read()
    crlf = tmp_path / "crlf.fasta.gz"
    crlf.write_bytes(gzip.compress(text.replace(b"\n", b"\r\n")))
    for name, path in (("lf", FIRST3), ("crlf", crlf)):
        assert run("--input", path, "--output_dir", tmp_path / name, "--max_seq_length", 512,
                   "--split", "1,0,0") == 0
    a, b = manifests(tmp_path / "lf")["train"], manifests(tmp_path / "crlf")["train"]
    assert a["files"] == b["files"]  # identical tokens, checksums and all


def test_typed_options_prepare_what_the_command_line_does(tmp_path):
    """The CLI and first-use preparation share one typed entry: options -> argv -> the same
    options, and prepare(options) writes the bytes the command writes."""
    from data_preparation.prepare_genomes import PrepareOptions, parse_args, prepare
    options = PrepareOptions(input=(FIRST3,), output_dir=str(tmp_path / "typed"), max_seq_length=512,
                             split=(0.67, 0.33, 0.0), seed=4, reading_frame="longest_orf", pack_sequences=True,
                             rename_duplicate_ids=True, num_workers=1)
    argv = options.argv()
    assert argv[:2] == ["--input", FIRST3] and "--split" in argv and "--min_codons" not in argv  # defaults left out
    assert parse_args(argv) == options
    prepare(options)
    assert run(*argv[:3], tmp_path / "cli", *argv[4:]) == 0
    for split in ("train", "val"):
        for f in sorted((tmp_path / "cli" / split).iterdir()):
            assert (tmp_path / "typed" / split / f.name).read_bytes() == f.read_bytes(), f


def test_unk_counts_ignore_the_filler_between_sequences():
    from data_preparation.prepare_genomes import _unk_counts
    tok = CodonTokenizer()
    # "AC" leaves a completed partial codon ([UNK]) that belongs to no sequence; so does "ACGN"
    ids, starts, counts = tok.encode_flat([b"AC", b"NNNACG", b"ACGN", b"TTT"])
    assert counts.tolist() == [0, 2, 1, 1]
    assert (ids == tok.unk_id).sum() == 3
    assert _unk_counts(ids, starts, counts, tok.unk_id).tolist() == [0, 1, 0, 0]
