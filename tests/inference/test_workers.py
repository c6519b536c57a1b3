"""The inference tools on K processes (--num_workers_per_node, issue 28): every process reads the
input, computes its share of the batches, and process 0 writes the output: byte for byte what
one process writes. A user error is still one line, exit code 2, nothing written."""

import pytest

from modelzoo.tools import embed, score
from tests.inference import before

pytestmark = [pytest.mark.usefixtures("one_thread"),  # the reference: one process on one thread, as each worker
              pytest.mark.distributed]  # several processes: `pytest -m "not distributed"` skips them

SMALL_BATCHES = ["--batch_tokens", str(2 * before.CONTEXT)]  # many batches per round: both processes get some


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    return before.records(root / "records.fasta"), {m: before.model_dir(root / "models", m) for m in ("gpt2", "bert")}


def test_two_processes_write_what_one_writes(inputs, tmp_path, capsys):
    fasta, dirs = inputs
    runs = [(embed, "gpt2", "--output_dir", "embeddings.npy", ["--pooling", "surprise", "--layer", "1"]),
            (score, "bert", "--output", "", ["--per_codon"])]
    for tool, model, flag, name, more in runs:
        outputs = []
        for workers in ("1", "2"):
            out = tmp_path / f"{model}_{workers}"
            argv = ["--model_dir", str(dirs[model]), "--input", str(fasta), flag, str(out), *SMALL_BATCHES, *more,
                    "--num_workers_per_node", workers]
            assert tool.main(argv) == 0, capsys.readouterr()
            outputs.append((out / name if name else out).read_bytes())
        assert outputs[0] == outputs[1], tool.__name__


def test_a_user_error_on_two_processes_is_one_line_and_writes_nothing(inputs, tmp_path, capfd):
    fasta, dirs = inputs
    out = tmp_path / "scores.tsv"
    out.write_text("a user's file\n")
    argv = ["--model_dir", str(dirs["gpt2"]), "--input", str(fasta), "--output", str(out),
            "--num_workers_per_node", "2"]
    assert score.main(argv) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "--overwrite" in err[0], err
    assert out.read_text() == "a user's file\n"
    assert score.main(argv[:-1] + ["0"]) == 2
    assert "--num_workers_per_node 0: must be 1 to" in capfd.readouterr().err
