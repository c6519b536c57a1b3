"""What the command-line tools write, and what they refuse to touch.

--overwrite replaces only a tool's own earlier output (never a user's file, never an input);
an output that cannot be written, a bad flag and every user error are one line, exit code 2,
with nothing written; embed and score stream their input and give what the in-memory
GenomeLM.embed / log_likelihood give.
"""

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_preparation import prepare_genomes
from modelzoo import GenomeLM, files
from modelzoo.config import ModelConfig, load_params
from data_preparation.first_use import ensure_prepared
from modelzoo.data.sequences import read_records
from modelzoo.errors import DataError
from modelzoo.files import OWNER_MARKER, NpyRows
from modelzoo.models import build_model
from modelzoo.tools import convert_checkpoint, embed, generate, mutations, score
from modelzoo.training.checkpoint import save_checkpoint
from tests.helpers import GENOMES, tiny_params, write_params

TOOLS = {"prepare_genomes": prepare_genomes, "embed": embed, "score": score, "generate": generate,
         "convert_checkpoint": convert_checkpoint, "mutations": mutations}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: OpenMP wake-ups cost more than the math


def random_model_dir(root: Path, name: str) -> Path:
    """A model_dir holding one checkpoint of a tiny untrained model (enough to run the tools)."""
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, hidden_size=32, num_hidden_layers=2, num_heads=4, max_position_embeddings=32)
    root.mkdir()
    save_checkpoint(root, 1, {"model": build_model(cfg).state_dict(), "step": 1,
                              "params": yaml.safe_dump({"model": cfg.model_dump()})})
    return root


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("models") / "gpt2", "gpt2")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("models") / "bert", "bert")


@pytest.fixture(scope="module")
def genes(tmp_path_factory) -> Path:
    """Records of 2 to 90 codons (1 to 3 windows of 32), some with N: batches cross records."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("genes") / "genes.fasta"
    with open(path, "w") as f:
        for k, codons in enumerate([2, 40, 7, 90, 31, 33, 1, 64, 12, 65, 5, 20, 3]):
            seq = "".join(rng.choice(list("ACGT"), size=3 * codons))
            if k % 4 == 1:
                seq = seq[:10] + "NNNN" + seq[14:]
            f.write(f">gene_{k} a description\n" + "\n".join(seq[i:i + 60] for i in range(0, len(seq), 60)) + "\n")
    return path


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A place under which nothing can be created: a read-only directory, or for root, whom
    permissions do not stop, a regular file."""
    if os.geteuid() == 0:
        blocker = tmp_path / "somefile"
        blocker.write_text("not a directory\n")
        yield blocker
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    yield locked
    locked.chmod(0o700)


def snapshot(root: Path) -> dict:
    """Every path under root with its bytes (None for a directory)."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def run(capsys, tool, *argv):
    code = TOOLS[tool].main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(capsys, tool, *argv) -> str:
    code, out, err = run(capsys, tool, *argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, out, err)
    return err


def prepare_argv(out, *more):
    return ["--input", GENOMES, "--output_dir", out, "--max_seq_length", 64, "--split", "0.67,0.33,0", *more]


def embed_argv(model_dir, out, *more, source=GENOMES):
    return ["--model_dir", model_dir, "--input", source, "--output_dir", out, "--batch_size", 16, *more]


# ---------------------------------------------------------------------- --overwrite keeps what is not the tool's

def test_prepare_overwrite_replaces_only_its_own_output(tmp_path, capsys):
    out = tmp_path / "shards"
    assert run(capsys, "prepare_genomes", *prepare_argv(out))[0] == 0
    assert (out / OWNER_MARKER).is_file()
    assert run(capsys, "prepare_genomes", *prepare_argv(out, "--overwrite", "--seed", 3))[0] == 0  # its own: fine
    assert "not empty" in refused(capsys, "prepare_genomes", *prepare_argv(out))  # without --overwrite: refused

    (out / "notes.txt").write_text("my notes\n")
    before = snapshot(tmp_path)
    err = refused(capsys, "prepare_genomes", *prepare_argv(out, "--overwrite"))
    assert "'notes.txt'" in err and "did not write" in err
    assert snapshot(tmp_path) == before  # notes.txt intact, nothing else changed either

    (out / "notes.txt").unlink()
    (out / "train" / "notes.txt").write_text("deeper\n")  # a user's file inside a split
    assert "'train/notes.txt'" in refused(capsys, "prepare_genomes", *prepare_argv(out, "--overwrite"))
    assert (out / "train" / "notes.txt").read_text() == "deeper\n"


def test_prepare_refuses_an_output_dir_holding_its_input(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    source = shutil.copy(GENOMES, out / "genomes.fasta.gz")
    before = snapshot(tmp_path)
    for more in ([], ["--overwrite"]):
        err = refused(capsys, "prepare_genomes", "--input", source, "--output_dir", out, "--max_seq_length", 64,
                      *more)
        assert "holds the input" in err
    assert snapshot(tmp_path) == before


def test_prepare_overwrites_an_output_from_before_the_owner_marker(tmp_path, capsys):
    """Prepared dirs in users' trees predate OWNER_MARKER: split directories whose manifests
    prepare_genomes wrote count as its own output, and nothing else does."""
    out = tmp_path / "shards"
    assert run(capsys, "prepare_genomes", *prepare_argv(out))[0] == 0
    (out / OWNER_MARKER).unlink()
    assert run(capsys, "prepare_genomes", *prepare_argv(out, "--overwrite", "--seed", 1))[0] == 0
    (out / OWNER_MARKER).unlink()
    (out / "val" / "extra.npy").write_bytes(b"x")
    assert "'val/extra.npy'" in refused(capsys, "prepare_genomes", *prepare_argv(out, "--overwrite"))

    other = tmp_path / "other"  # no marker and no shard manifest: not prepare_genomes' output
    other.mkdir()
    (other / "train").mkdir()
    (other / "train" / "manifest.json").write_text("{}")
    assert "not written by" in refused(capsys, "prepare_genomes", *prepare_argv(other, "--overwrite"))
    assert (other / "train" / "manifest.json").read_text() == "{}"


def test_prepare_on_first_use_prepares_a_missing_split_again(tmp_path, capsys):
    shards = tmp_path / "shards"
    raw = tiny_params(shards, tmp_path / "md")
    for section in ("train_input", "eval_input"):
        raw[section]["prepare"] = {"input": [str(GENOMES)], "split": [0.67, 0.33, 0.0]}
    params = load_params(write_params(tmp_path / "p.yaml", raw), check_paths=False)
    ensure_prepared(params)
    manifest = (shards / "val" / "manifest.json").read_bytes()
    for marker in (True, False):  # one it wrote, and one from before the owner marker
        if not marker:
            (shards / OWNER_MARKER).unlink()
        shutil.rmtree(shards / "val")
        ensure_prepared(params)
        assert (shards / "val" / "manifest.json").read_bytes() == manifest
        assert "--overwrite" in capsys.readouterr().out

    shutil.rmtree(shards / "val")
    (shards / "notes.txt").write_text("mine\n")
    with pytest.raises(DataError, match="holds 'notes.txt', which prepare_genomes did not write") as e:
        ensure_prepared(params)
    assert "\n" not in str(e.value) and (shards / "notes.txt").is_file() and (shards / "train").is_dir()


def test_embed_overwrite_replaces_only_its_own_output(gpt2_dir, genes, tmp_path, capsys):
    out = tmp_path / "emb"
    assert run(capsys, "embed", *embed_argv(gpt2_dir, out, source=genes))[0] == 0
    assert run(capsys, "embed", *embed_argv(gpt2_dir, out, "--overwrite", source=genes))[0] == 0
    (out / "notes.txt").write_text("my notes\n")
    before = snapshot(tmp_path)
    assert "'notes.txt'" in refused(capsys, "embed", *embed_argv(gpt2_dir, out, "--overwrite", source=genes))
    assert snapshot(tmp_path) == before

    holder = tmp_path / "holder"  # an embed output the user then stored the input in
    assert run(capsys, "embed", *embed_argv(gpt2_dir, holder, source=genes))[0] == 0
    inside = shutil.copy(genes, holder / "genes.fasta")
    before = snapshot(tmp_path)
    err = refused(capsys, "embed", *embed_argv(gpt2_dir, holder, "--overwrite", source=inside))
    assert "holds the input" in err
    assert snapshot(tmp_path) == before

    plain = tmp_path / "plain"  # a directory no tool wrote
    plain.mkdir()
    (plain / "a.txt").write_text("a")
    assert "not written by" in refused(capsys, "embed", *embed_argv(gpt2_dir, plain, "--overwrite", source=genes))
    assert (plain / "a.txt").read_text() == "a"


def test_hf_export_overwrite_replaces_only_an_earlier_export(gpt2_dir, tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    argv = ["--to", "hf", "--model_dir", gpt2_dir, "--output_dir", out]
    assert run(capsys, "convert_checkpoint", *argv)[0] == 0
    assert "not empty" in refused(capsys, "convert_checkpoint", *argv)
    assert run(capsys, "convert_checkpoint", *argv, "--overwrite")[0] == 0
    (out / "README.md").write_text("model card\n")
    before = snapshot(tmp_path)
    assert "'README.md'" in refused(capsys, "convert_checkpoint", *argv, "--overwrite")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------- output files: the same rule

def score_argv(model_dir, out, *more, source=None):
    return ["--model_dir", model_dir, "--input", source or GENOMES, "--output", out, "--batch_size", 16, *more]


def generate_argv(model_dir, out, *more):
    return ["--model_dir", model_dir, "--max_codons", 2, "--seed", 0, "--output", out, *more]


def test_output_files_replace_only_their_own_unchanged_output(gpt2_dir, genes, tmp_path, capsys):
    """score and generate --output: nothing existing without --overwrite; with it, only a file
    that tool wrote (its marker) and nobody changed since; never a user's file."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    before = snapshot(tmp_path)
    assert "exists (use --overwrite" in refused(capsys, "score", *score_argv(gpt2_dir, notes, source=genes))
    assert "not written by modelzoo.tools.score" in refused(
        capsys, "score", *score_argv(gpt2_dir, notes, "--overwrite", source=genes))
    assert snapshot(tmp_path) == before

    out = tmp_path / "scores.tsv"
    assert run(capsys, "score", *score_argv(gpt2_dir, out, source=genes))[0] == 0
    first = out.read_bytes()
    assert "exists" in refused(capsys, "score", *score_argv(gpt2_dir, out, source=genes))
    assert run(capsys, "score", *score_argv(gpt2_dir, out, "--overwrite", source=genes))[0] == 0  # its own
    assert out.read_bytes() == first
    # another tool's file is not this tool's
    assert "not written by modelzoo.tools.generate" in refused(capsys, "generate", *generate_argv(
        gpt2_dir, out, "--overwrite"))
    out.write_bytes(first + b"a row the user added\n")  # changed since: no longer the tool's alone
    assert "or changed since" in refused(capsys, "score", *score_argv(gpt2_dir, out, "--overwrite", source=genes))
    out.unlink()
    out.write_text("a user's file, made where an output was deleted\n")  # the marker left behind
    assert "not written by" in refused(capsys, "score", *score_argv(gpt2_dir, out, "--overwrite", source=genes))

    fasta = tmp_path / "g.fasta"
    assert run(capsys, "generate", *generate_argv(gpt2_dir, fasta))[0] == 0
    assert run(capsys, "generate", *generate_argv(gpt2_dir, fasta, "--overwrite"))[0] == 0
    fasta.unlink()
    fake = files.file_marker(out)  # something else under the marker's name is not replaced either
    fake.unlink()
    fake.write_text("not a marker")
    out.unlink()
    assert "is not an owner marker" in refused(capsys, "score", *score_argv(gpt2_dir, out, source=genes))
    assert fake.read_text() == "not a marker"


def test_no_tool_writes_over_a_checkpoint_it_reads(gpt2_dir, genes, tmp_path, capsys, monkeypatch):
    """The checkpoint --model_dir resolves to, its seal and the model_dir's other checkpoints are
    inputs: refused as outputs with or without --overwrite, named directly, through a symbolic
    link or by a relative path."""
    model_dir = tmp_path / "md"
    shutil.copytree(gpt2_dir, model_dir)
    save_checkpoint(model_dir, 0, {"model": {}, "step": 0})  # an older checkpoint: also never an output
    link = tmp_path / "latest.mdl"
    link.symlink_to(model_dir / "checkpoint_1.mdl")
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    for target in [model_dir / "checkpoint_1.mdl", Path("md/checkpoint_1.mdl"), Path("md/checkpoint_1.mdl.sha256"),
                   model_dir / "checkpoint_0.mdl", link, Path("md/../md/checkpoint_0.mdl.sha256")]:
        for more in ([], ["--overwrite"]):
            for model in (model_dir, Path("md"), link):
                argv = generate_argv(model, target, *more)
                if model == link:
                    argv[:2] = ["--checkpoint_path", link]
                assert "is the input" in refused(capsys, "generate", *argv), (target, model)
            assert "is the input" in refused(capsys, "score", *score_argv(Path("md"), target, *more, source=genes))
    for tool, flag in (("embed", "--output_dir"), ("mutations", "--output_dir")):
        argv = ["--model_dir", "md", "--input", genes, flag, ".", "--overwrite"]
        if tool == "mutations":
            argv += ["--reference", genes]
        assert "holds the input" in refused(capsys, tool, *argv)
    assert snapshot(tmp_path) == before


def test_a_symbolic_link_is_never_replaced_by_an_output(gpt2_dir, genes, tmp_path, capsys):
    """The output would replace the link itself, not what it points to: refused, with the path it
    points to in the message."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "emb").symlink_to(real)
    (tmp_path / "mine.tsv").write_text("mine\n")
    (tmp_path / "s.tsv").symlink_to(tmp_path / "mine.tsv")
    before = snapshot(tmp_path)
    (tmp_path / "dangling.tsv").symlink_to(tmp_path / "missing.tsv")
    assert "is a symbolic link" in refused(capsys, "embed", *embed_argv(gpt2_dir, tmp_path / "emb", source=genes))
    for out in ("s.tsv", "dangling.tsv"):
        for more in ([], ["--overwrite"]):
            assert "is a symbolic link" in refused(capsys, "score", *score_argv(gpt2_dir, tmp_path / out, *more,
                                                                                source=genes))
    (tmp_path / "dangling.tsv").unlink()
    assert snapshot(tmp_path) == before and (tmp_path / "s.tsv").is_symlink()


# ---------------------------------------------------------------------- unwritable outputs, bad flags

def test_unwritable_outputs_are_one_line_and_write_nothing(gpt2_dir, genes, unwritable, tmp_path, capsys):
    before = snapshot(tmp_path)
    cases = [
        ("prepare_genomes", prepare_argv(unwritable / "shards")),
        ("prepare_genomes", prepare_argv(unwritable / "deeper" / "shards")),
        ("embed", embed_argv(gpt2_dir, unwritable / "emb", source=genes)),
        # the output is refused before the model is even looked for
        ("score", ["--model_dir", tmp_path / "nowhere", "--input", genes, "--output", unwritable / "s.tsv"]),
        ("generate", ["--model_dir", tmp_path / "nowhere", "--max_codons", 3, "--output", unwritable / "g.fa"]),
        ("score", ["--model_dir", gpt2_dir, "--input", genes, "--output", tmp_path / "missing" / "s.tsv"]),
        ("generate", ["--model_dir", gpt2_dir, "--max_codons", 3, "--output", tmp_path]),
    ]
    for tool, argv in cases:
        err = refused(capsys, tool, *argv)
        assert "cannot write" in err or "is a directory" in err, err
        assert snapshot(tmp_path) == before, tool


def test_failed_writes_are_one_line_and_leave_nothing(gpt2_dir, genes, tmp_path, capsys, monkeypatch):
    """The write itself failing (not only a refused place): a temporary file that cannot be
    created, a temporary directory that cannot be made."""
    jammed = tmp_path / f".s.tsv.tmp-{os.getpid()}"  # where score's temporary file goes
    jammed.mkdir()
    before = snapshot(tmp_path)
    assert "cannot write" in refused(capsys, "score", "--model_dir", gpt2_dir, "--input", genes,
                                     "--output", tmp_path / "s.tsv")
    assert snapshot(tmp_path) == before

    def denied(prefix, dir):
        raise PermissionError(13, "Permission denied", str(Path(dir) / prefix))

    monkeypatch.setattr(files.tempfile, "mkdtemp", denied)
    err = refused(capsys, "prepare_genomes", *prepare_argv(tmp_path / "new" / "deeper" / "shards"))
    assert "cannot write (Permission denied)" in err
    assert snapshot(tmp_path) == before  # the parents it made are gone again


def test_score_refuses_to_write_over_its_input(gpt2_dir, genes, tmp_path, capsys):
    source = shutil.copy(genes, tmp_path / "genes.fasta")
    before = snapshot(tmp_path)
    assert "is the input" in refused(capsys, "score", "--model_dir", gpt2_dir, "--input", source, "--output", source)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_bad_flag_is_one_line_without_usage(tool, capsys):
    with pytest.raises(SystemExit) as e:
        TOOLS[tool].main(["--no_such_flag", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "usage" not in err


# ---------------------------------------------------------------------- streaming

def test_embed_streams_and_gives_the_in_memory_embeddings(gpt2_dir, genes, tmp_path, capsys):
    records = list(read_records(genes))
    labels = tmp_path / "labels.tsv"
    labels.write_text("id\tgroup\ngene_3\tA\ngene_7\tB\n")
    out = tmp_path / "emb"
    code, text, err = run(capsys, "embed", *embed_argv(gpt2_dir, out, "--batch_size", 3, "--labels", labels,
                                                        "--label_column", "group", source=genes))
    assert code == 0, err
    expected = GenomeLM.load(gpt2_dir).embed(records, batch_size=3)
    saved = tmp_path / "expected.npy"
    np.save(saved, expected)
    assert (out / "embeddings.npy").read_bytes() == saved.read_bytes()  # the same file np.save writes
    rows = [line.split("\t") for line in (out / "ids.tsv").read_text().splitlines()]
    assert rows[0] == ["id", "group"] and [r[0] for r in rows[1:]] == [r.id for r in records]
    assert [r[1] for r in rows[1:]].count("(none)") == len(records) - 2 and rows[4][1] == "A"
    assert f"wrote {len(records)} embeddings of size 32" in text

    unknown = tmp_path / "unknown.tsv"
    unknown.write_text("id\tgroup\nnobody\tA\n")
    assert "no row for any record" in refused(capsys, "embed", *embed_argv(
        gpt2_dir, tmp_path / "e2", "--labels", unknown, "--label_column", "group", source=genes))
    assert not (tmp_path / "e2").exists()


def test_embed_draws_a_deterministic_map_of_the_labelled_genomes(gpt2_dir, genes, tmp_path, capsys):
    labels = tmp_path / "labels.tsv"
    labels.write_text("id\tgroup\n" + "".join(f"gene_{k}\t{'AB'[k % 2]}\n" for k in range(10)))
    out = tmp_path / "emb"
    argv = embed_argv(gpt2_dir, out, "--labels", labels, "--label_column", "group", source=genes)
    code, text, err = run(capsys, "embed", *argv)
    assert code == 0, err
    assert "with a t-SNE map in map.png" in text
    first = (out / "map.png").read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    assert "map.png" in (out / OWNER_MARKER).read_text()  # its own file: --overwrite may replace it
    assert run(capsys, "embed", *argv, "--overwrite")[0] == 0
    assert (out / "map.png").read_bytes() == first  # a fixed random state: the same picture
    assert run(capsys, "embed", *argv, "--overwrite", "--no_map")[0] == 0
    assert not (out / "map.png").exists()
    assert run(capsys, "embed", *embed_argv(gpt2_dir, tmp_path / "plain", source=genes))[0] == 0
    assert not (tmp_path / "plain" / "map.png").exists()  # no labels, no map


def test_map_legend_groups_rare_labels_and_greys_the_unlabelled():
    from modelzoo.tools import maps

    labels = ["(none)"] * 3 + ["B"] * 2 + ["A"] * 2 + ["C"] * 5 + [f"rare{k:02d}" for k in range(20)]
    groups, group_of = maps._groups(labels)
    assert groups[:3] == ["C", "A", "B"] and groups[-2:] == ["other (6 labels)", "(none)"]
    assert len(groups) == maps.MAX_GROUPS + 1 and group_of["rare19"] == "other (6 labels)"
    colours = maps._colours(groups)
    assert colours["(none)"] == maps.GREY and len(set(colours.values())) == len(groups)
    assert maps.project(np.ones((3, 4)))[1] == "PCA" and maps.project(np.ones((1, 4)))[0].shape == (1, 2)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_score_streams_and_gives_the_in_memory_scores(name, gpt2_dir, bert_dir, genes, tmp_path, capsys):
    model_dir = {"gpt2": gpt2_dir, "bert": bert_dir}[name]
    out = tmp_path / "scores.tsv"
    code, _, err = run(capsys, "score", "--model_dir", model_dir, "--input", genes, "--output", out,
                       "--batch_size", 5)
    assert code == 0, err
    records = list(read_records(genes))
    totals, counts = GenomeLM.load(model_dir).log_likelihood(records, batch_size=5, return_counts=True)
    lines = out.read_text().splitlines()
    assert lines[0].split("\t")[0] == "id" and len(lines) == len(records) + 1
    for line, rec, total, n in zip(lines[1:], records, totals, counts):
        mean = total / n if n else math.nan
        assert line == f"{rec.id}\t{n}\t{total:.4f}\t{mean:.6f}\t{math.exp(-mean):.4f}"


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_streams_read_their_input_as_they_go(name, gpt2_dir, bert_dir, genes):
    """The first results come before the input is read to its end, and equal the in-memory ones
    for any batch size (batches cross record boundaries the same way)."""
    lm = GenomeLM.load({"gpt2": gpt2_dir, "bert": bert_dir}[name])
    records = list(read_records(genes))
    read = []

    def reading():
        for rec in records:
            read.append(rec.id)
            yield rec

    blocks = lm.embed_stream(reading(), layer=[0, -1], batch_size=2)
    done, first = next(blocks)
    assert len(read) < len(records) and [r.id for r in done] == read[:len(done)]
    assert first.shape == (2, len(done), 32)
    for batch_size in (1, 2, 7):
        streamed = [v for _, v in lm.embed_stream(iter(records), batch_size=batch_size)]
        assert np.array_equal(np.concatenate(streamed), lm.embed(records, batch_size=batch_size))
        scored = [s for _, s in lm.log_likelihood_stream(iter(records), batch_size=batch_size)]
        assert np.array_equal(np.concatenate([v for v, _ in scored]), lm.log_likelihood(records, batch_size=batch_size))


def test_npy_rows_writes_what_np_save_writes(tmp_path):
    rows = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    with NpyRows(tmp_path / "a.npy", (5,)) as out:
        for block in (rows[:3], rows[3:3], rows[3:]):
            out.append(block)
    np.save(tmp_path / "b.npy", rows)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
