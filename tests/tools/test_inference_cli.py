"""python -m modelzoo.tools.{embed,generate,score} on a tiny GPT-2 trained a few steps."""

import numpy as np
import pytest
import torch
import yaml

from modelzoo import GenomeLM, cli
from modelzoo.config import ModelConfig
from modelzoo.data.sequences import read_records
from modelzoo.models import build_model
from modelzoo.tools import embed, generate, score
from modelzoo.training.checkpoint import save_checkpoint
from tests.helpers import GENOMES, tiny_params, write_params


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: OpenMP wake-ups cost more than the math


@pytest.fixture(scope="module")
def model_dir(shards_msl64, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    params = write_params(root / "p.yaml", tiny_params(shards_msl64, root / "md", max_steps=2, checkpoint_steps=2))
    assert cli.main(["CPU", "--params", str(params)]) == 0
    return root / "md"


@pytest.fixture(scope="module")
def records():
    return list(read_records(GENOMES))


def run(tool, capsys, *argv):
    code = tool.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_embed_writes_vectors_ids_and_a_projector(model_dir, records, tmp_path, capsys):
    labels = tmp_path / "labels.tsv"
    labels.write_text("accession\tclade\n" + f"{records[0].id}\t19A\n{records[1].id}\t20B\n")
    out = tmp_path / "emb"
    code, text = run(embed, capsys, "--model_dir", model_dir, "--input", GENOMES, "--output_dir", out,
                     "--labels", labels, "--label_column", "clade", "--batch_size", 16)
    assert code == 0, text
    vectors = np.load(out / "embeddings.npy")
    assert vectors.shape == (3, 32) and np.isfinite(vectors).all()
    np.testing.assert_allclose(vectors, GenomeLM.load(model_dir).embed(records), rtol=1e-5, atol=1e-6)
    rows = [line.split("\t") for line in (out / "ids.tsv").read_text().splitlines()]
    assert rows == [["id", "clade"], [records[0].id, "19A"], [records[1].id, "20B"], [records[2].id, "(none)"]]
    projector = {p.name: p for p in out.rglob("*") if p.is_file()}
    assert {"projector_config.pbtxt", "tensors.tsv", "metadata.tsv"} <= set(projector)
    assert projector["metadata.tsv"].read_text().splitlines()[0] == "id\tclade"
    assert len(projector["tensors.tsv"].read_text().splitlines()) == 3
    assert (out / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "PCA map in map.png" in text  # 3 dots

    code, text = run(embed, capsys, "--model_dir", model_dir, "--input", GENOMES, "--output_dir", out)
    assert code == 2 and text.count("\n") == 1 and "not empty" in text  # no silent overwrite


def test_generate_writes_reproducible_fasta_of_codons(model_dir, tmp_path, capsys):
    paths = [tmp_path / "a.fasta", tmp_path / "b.fasta"]
    for path in paths:
        code, text = run(generate, capsys, "--model_dir", model_dir, "--num_sequences", 3, "--max_codons", 70,
                         "--output", path, "--seed", 4, "--top_k", 30)
        assert code == 0, text
    generated = list(read_records(paths[0]))
    assert [r.id for r in generated] == ["generated_1", "generated_2", "generated_3"]
    for rec in generated:
        assert rec.seq.startswith("ATG") and len(rec.seq) == 3 * 71 and set(rec.seq) <= set("ACGT")
    assert paths[0].read_text() == paths[1].read_text()


def test_score_writes_one_row_per_record(model_dir, records, tmp_path, capsys):
    out = tmp_path / "scores.tsv"
    code, text = run(score, capsys, "--model_dir", model_dir, "--input", GENOMES, "--output", out)
    assert code == 0, text
    header, *rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert header == ["id", "scored_codons", "log_likelihood", "per_codon_log_likelihood", "perplexity"]
    expected = GenomeLM.load(model_dir).log_likelihood(records)
    assert [r[0] for r in rows] == [r.id for r in records]
    np.testing.assert_allclose([float(r[2]) for r in rows], expected, rtol=1e-5)
    for r in rows:
        assert float(r[4]) == pytest.approx(np.exp(-float(r[2]) / int(r[1])), rel=1e-3)


def test_bad_inputs_are_one_line_and_exit_2(model_dir, tmp_path, capsys):
    not_fasta = tmp_path / "notes.txt"
    not_fasta.write_text("hello\n")
    torch.manual_seed(0)
    bert = ModelConfig(name="bert", hidden_size=32, num_hidden_layers=1, num_heads=4, max_position_embeddings=16)
    (tmp_path / "bert").mkdir()
    save_checkpoint(tmp_path / "bert", 1, {"model": build_model(bert).state_dict(), "step": 1,
                                           "params": yaml.safe_dump({"model": bert.model_dump()})})
    cases = [
        (score, ["--model_dir", tmp_path / "nowhere", "--input", GENOMES, "--output", tmp_path / "s.tsv"],
         "no such model_dir"),
        (score, ["--model_dir", model_dir, "--input", not_fasta, "--output", tmp_path / "s.tsv"], "not FASTA"),
        (embed, ["--model_dir", model_dir, "--input", GENOMES, "--output_dir", tmp_path / "e",
                 "--labels", not_fasta, "--label_column", "clade"], "no column 'clade'"),
        (generate, ["--model_dir", tmp_path / "bert", "--max_codons", 5, "--output", tmp_path / "g.fasta"],
         "causal model"),
        (generate, ["--model_dir", model_dir, "--max_codons", 5, "--prompt", "ATGA", "--output",
                    tmp_path / "g.fasta"], "whole codons"),
        *[(generate, ["--model_dir", model_dir, "--max_codons", 5, "--temperature", t, "--output",
                      tmp_path / "g.fasta"], f"temperature {t}: must be a finite number >= 0") for t in ("nan", "inf")],
        (generate, ["--model_dir", model_dir, "--max_codons", 5, "--seed", 2 ** 64, "--output", tmp_path / "g.fasta"],
         "--seed 18446744073709551616: must be 0 to"),
        (generate, ["--model_dir", model_dir, "--max_codons", 10 ** 7, "--output", tmp_path / "g.fasta"],
         "max_codons 10000000: must be 1 to 1,000,000"),
        (score, ["--model_dir", model_dir, "--batch_size", 2 ** 64, "--input", GENOMES, "--output", tmp_path / "s.tsv"],
         "--batch_size 18446744073709551616: must be 1 to"),
        *[(tool, ["--model_dir", model_dir, "--device", device, *argv], f"--device {device!r}: not usable here")
          for device in ("foo", "cuda:99", "meta")
          for tool, argv in ((generate, ["--max_codons", 5, "--output", tmp_path / "g.fasta"]),
                             (score, ["--input", GENOMES, "--output", tmp_path / "s.tsv"]),
                             (embed, ["--input", GENOMES, "--output_dir", tmp_path / "e"]))],
    ]
    for tool, argv, message in cases:
        code, text = run(tool, capsys, *argv)
        assert code == 2 and text.count("\n") == 1 and message in text, text
    assert not any(p.name in {"s.tsv", "e", "g.fasta"} for p in tmp_path.iterdir())  # nothing half-written
