"""Bad input end to end: one line naming what and where, exit code 2, nothing half-written.

Reader- and schema-level cases live in modelzoo_data/test_sequences.py,
data_preparation/test_prepare_genomes.py, test_config.py and modelzoo_data/test_shards_and_dataloader.py;
here each goes through the command a user runs.
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from data_preparation.prepare_genomes import main as prepare_main
from modelzoo.data.sequences import read_records
from modelzoo.data.shards import ShardSet
from modelzoo.data.tokenizer import CodonTokenizer
from tests.helpers import DATA, error_line, one_line_error, params_file, run_cli, steady_params, write_params

# ------------------------------------------------------------------ genome files -> prepare_genomes


def prepare(capsys, out: Path, *inputs, code: int = 2, **options) -> str:
    argv = ["--input", *map(str, inputs), "--output_dir", str(out), "--max_seq_length", "64", "--split", "1,0,0"]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    capsys.readouterr()
    assert prepare_main(argv) == code
    out_text, err = capsys.readouterr()
    return error_line(err) if code == 2 else out_text


GENOME_FILES = [
    ("binary.fa", bytes(range(256)) * 8, "binary file"),
    ("empty.fasta", b"", "empty file"),
    ("blank.fasta.gz", gzip.compress(b"\r\n\r\n"), "empty file"),
    ("page.fasta.gz", gzip.compress(b"<!doctype html><title>502 Bad Gateway</title>"), "HTML"),
    ("truncated.gb.gz", gzip.compress((DATA / "NC_045512.2.gb").read_bytes())[:5000], "gzip"),
    ("only_N.fa", b">allN\n" + b"N" * 30000 + b"\n", "no usable record among 1 read (1 too many [UNK]"),
    ("no_sequence.fa", b">a\n>b\n\n", "no usable record among 2 read (2 empty"),
    ("dup.fa", b">x\nATGAAACCCGGGTTTATGAAACCCGGG\n>x\nATGAAACCCGGGTTTATGAAACCCGGG\n", "duplicate record id 'x'"),
]


@pytest.mark.parametrize("name, content, expected", GENOME_FILES, ids=[case[0] for case in GENOME_FILES])
def test_unusable_genome_files_write_nothing(tmp_path, capsys, name, content, expected):
    bad = tmp_path / "in" / name
    bad.parent.mkdir()
    bad.write_bytes(content)
    out = tmp_path / "out" / "shards"
    line = prepare(capsys, out, bad)
    assert str(bad) in line and expected in line, line
    assert [p.name for p in tmp_path.iterdir()] == ["in"]  # no output_dir, no hidden temporary dir


def test_unusual_but_valid_spellings_give_the_same_tokens(tmp_path, capsys):
    """lowercase, RNA, Windows line endings and one 30 kb line are the same genome; IUPAC codes
    become [UNK] in exactly their codons; a record with no sequence next to good ones is skipped."""
    genome = next(iter(read_records(DATA / "NC_045512.2.gb"))).seq  # 29,903 nt
    wrapped = "\n".join(genome[i:i + 70] for i in range(0, len(genome), 70))
    iupac = genome[:300] + "RYK" + genome[303:]  # codon 101 becomes ambiguous
    fasta = tmp_path / "spellings.fa"
    fasta.write_bytes((f">plain\n{wrapped}\n>one_line\n{genome}\n>lower_rna\n{genome.lower().replace('t', 'u')}\n"
                       f">iupac\n{iupac}\n>empty\n\n").replace("\n", "\r\n").encode())
    report = prepare(capsys, tmp_path / "out", fasta, code=0)
    assert "records read: 5, kept: 4" in report and "skipped 1: empty" in report
    shards = ShardSet(tmp_path / "out" / "train")
    rows = {}
    for rec, start in zip(shards.records.entries(), shards.records.start_rows().tolist()):
        rows[rec["id"]] = np.concatenate([shards[start + k] for k in range(rec["num_windows"])])[:rec["num_tokens"]]
    assert np.array_equal(rows["plain"], CodonTokenizer().encode(genome)[:len(rows["plain"])])
    assert len(rows["plain"]) > 9900  # all but a short trailing window of the 9,967 codons
    assert all(np.array_equal(rows["plain"], rows[k]) for k in ("one_line", "lower_rna"))
    differs = np.flatnonzero(rows["plain"] != rows["iupac"])
    assert differs.tolist() == [100] and rows["iupac"][100] == CodonTokenizer().unk_id


# ------------------------------------------------------------------ params -> run.py

def bad_params(tmp_path, shards, edit) -> Path:
    raw = steady_params(shards, tmp_path / "model_dir")
    edit(raw)
    return write_params(tmp_path / "bad.yaml", raw)


def assert_refused(capsys, tmp_path, params: Path, *expected: str, argv=()) -> None:
    line = one_line_error(capsys, "CPU", "--params", params, *argv)
    for text in expected:
        assert text in line, line
    assert not (tmp_path / "model_dir").exists()


def test_yaml_syntax_error_names_the_line(tmp_path, shards, capsys):
    params = params_file(tmp_path, shards)
    lines = params.read_text().splitlines()
    lines[3] = lines[3].replace(":", "", 1) + ": [unclosed"
    params.write_text("\n".join(lines) + "\n")
    assert_refused(capsys, tmp_path, params, str(params), "line ", "invalid yaml")


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p["runconfig"].update(nonfinite_polcy="skip"),
     ["runconfig.nonfinite_polcy: unknown key; did you mean 'nonfinite_policy'?"]),
    (lambda p: p["train_input"].update(batch_size="four"), ["train_input.batch_size", "'four'"]),
    (lambda p: p["runconfig"].update(nonfinite_policy="ignore"), ["runconfig.nonfinite_policy", "'ignore'"]),
    (lambda p: p["train_input"].update(data_dir="/nonexistent/train"),
     ["train_input.data_dir: directory '/nonexistent/train' does not exist"]),
    # mode train: eval_input dropped so that one section is wrong (both wrong: the test below)
    (lambda p: (p["model"].update(max_position_embeddings=32), p.pop("eval_input")),
     ["train_input.max_seq_length: 64 is above model."]),
], ids=["unknown_key", "wrong_type", "bad_choice", "missing_data_dir", "msl_above_positions"])
def test_params_errors(tmp_path, shards, capsys, edit, expected):
    params = bad_params(tmp_path, shards, edit)
    assert_refused(capsys, tmp_path, params, str(params), *expected)


def test_every_problem_of_a_file_is_one_line_each(tmp_path, shards, capsys):
    params = bad_params(tmp_path, shards, lambda p: p["model"].update(max_position_embeddings=32))
    code, _, err = run_cli(capsys, "CPU", "--params", params)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err
    assert [e.split(": ")[2] for e in errors] == ["train_input.max_seq_length", "eval_input.max_seq_length"], err
    assert not (tmp_path / "model_dir").exists()


def test_params_path_a_directory_or_not_utf8(tmp_path, shards, capsys):
    assert_refused(capsys, tmp_path, tmp_path, str(tmp_path), "is a directory")
    params = params_file(tmp_path, shards)
    params.write_bytes(params.read_bytes().replace(b"model:", b"# caf\xe9\nmodel:", 1))
    assert_refused(capsys, tmp_path, params, str(params), "not UTF-8")


def test_validate_only_opens_the_shards(tmp_path, shards, capsys):
    """A max_seq_length that does not match the shards is caught before any job is queued."""
    mismatch = bad_params(tmp_path, shards, lambda p: p.update(
        train_input=dict(p["train_input"], max_seq_length=32), eval_input=dict(p["eval_input"], max_seq_length=32)))
    line = one_line_error(capsys, "CPU", "--params", mismatch, "--validate_only")
    assert "max_seq_length 32" in line and "max_seq_length 64" in line
    assert not (tmp_path / "model_dir").exists()


def copy_shards(shards: Path, tmp_path: Path) -> Path:
    import shutil
    target = tmp_path / "shards"
    shutil.copytree(shards, target)
    return target


def test_data_errors_come_before_anything_is_written(tmp_path, shards, capsys):
    """Mismatching shards are found while opening the data, before model_dir is created; and in
    an existing model_dir (a resumed run) not a byte changes, run.log included."""
    local = copy_shards(shards, tmp_path)
    for existing in (False, True):
        if existing:
            assert run_cli(capsys, "CPU", "--params", params_file(tmp_path, local, max_steps=2))[0] == 0
        model_dir = tmp_path / "model_dir"
        before = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} if existing else None

        mismatch = bad_params(tmp_path, local, lambda p: p.update(
            train_input=dict(p["train_input"], max_seq_length=32), eval_input=dict(p["eval_input"], max_seq_length=32)))
        line = one_line_error(capsys, "CPU", "--params", mismatch)
        assert "max_seq_length 32" in line and "max_seq_length 64" in line and str(local / "train") in line

        npy = local / "train" / "tokens_00000.npy"
        good = npy.read_bytes()
        flipped = bytearray(good)
        flipped[-1] ^= 1
        npy.write_bytes(bytes(flipped))
        line = one_line_error(capsys, "CPU", "--params", params_file(tmp_path, local))
        assert str(npy) in line and "checksum mismatch" in line
        npy.write_bytes(good)

        manifest = local / "val" / "manifest.json"
        good_manifest = manifest.read_text()
        m = json.loads(good_manifest)
        m["num_windows"] += 1
        manifest.write_text(json.dumps(m))
        line = one_line_error(capsys, "CPU", "--params", params_file(tmp_path, local), "--mode", "eval")
        assert str(manifest) in line and "num_windows" in line
        manifest.write_text(good_manifest)

        if existing:
            assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before
        else:
            assert not model_dir.exists()


def test_batch_size_not_divisible_by_the_systems(tmp_path, shards, capsys):
    params = params_file(tmp_path, shards)
    line = one_line_error(capsys, "CSX", "--params", params, "--num_csx", 3)
    assert "train_input.batch_size: 4 is not divisible by the 3" in line
    assert not (tmp_path / "model_dir").exists()


def test_label_table_missing_ids(tmp_path, shards, capsys):
    labels = tmp_path / "clades.tsv"
    labels.write_text("id\tclade\nWuhan/Hu-1/2019\t19A\nWuhan/WH01/2019\t19B\n")  # no Australia/VIC05/2020

    def classifier(p):
        p["model"].update(name="bert", num_labels=2)
        for section in ("train_input", "eval_input"):
            p[section].update(labels_file=str(labels), label_column="clade")

    params = bad_params(tmp_path, shards, classifier)
    assert_refused(capsys, tmp_path, params, str(labels), "no clade for record")


# ------------------------------------------------------------------ flags -> run.py

@pytest.mark.parametrize("argv, expected", [
    (["TPU"], "argument device: invalid choice: 'TPU'"),
    (["CPU", "--mode", "fit"], "argument --mode/-m: invalid choice: 'fit'"),
    (["CPU", "--max_steps", "ten"], "argument --max_steps: invalid int value: 'ten'"),
])
def test_unknown_device_mode_or_flag_value(tmp_path, shards, capsys, argv, expected):
    params = params_file(tmp_path, shards)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, *argv[:1], "--params", params, *argv[1:])
    assert exit_info.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert expected in line and capsys.readouterr().err == ""
    assert not (tmp_path / "model_dir").exists()


def test_checkpoint_path_missing_or_of_another_architecture(tmp_path, shards, capsys):
    trained = tmp_path / "trained"
    raw = steady_params(shards, trained, max_steps=2)
    assert run_cli(capsys, "CPU", "--params", write_params(tmp_path / "trained.yaml", raw))[0] == 0
    checkpoint = trained / "checkpoint_2.mdl"

    assert_refused(capsys, tmp_path, params_file(tmp_path, shards), f"{tmp_path / 'nope.mdl'}: checkpoint not found",
                   argv=["--checkpoint_path", tmp_path / "nope.mdl"])

    wider = copy.deepcopy(raw)
    wider["model"]["hidden_size"] = 64
    wider["runconfig"]["model_dir"] = str(tmp_path / "model_dir")
    params = write_params(tmp_path / "wider.yaml", wider)
    for mode in ("train", "eval"):
        assert_refused(capsys, tmp_path, params, str(checkpoint), "has shape (69, 32) in the checkpoint but (69, 64)",
                       argv=["--checkpoint_path", checkpoint, "--mode", mode])

    gptj = copy.deepcopy(wider)
    gptj["model"].update(name="gptj", hidden_size=32)
    assert_refused(capsys, tmp_path, write_params(tmp_path / "gptj.yaml", gptj), str(checkpoint),
                   "belongs to another model", argv=["--checkpoint_path", checkpoint])
