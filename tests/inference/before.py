"""What embed and score wrote before packed inference (issue 28), for the tests that check the tools'
outputs are unchanged: tiny seeded models and seeded records of mixed lengths (one codon to
several windows, some with N), the tools run on them, their outputs kept under
tests/data/inference_before/.

    python -m tests.inference.before     # rewrites the saved outputs (only to be run on the old code)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from modelzoo.models import build_model
from modelzoo.training.checkpoint import save_checkpoint
from tests.helpers import DATA, tiny_config

SAVED = DATA / "inference_before"
CONTEXT = 24
LENGTHS = [2, 40, 7, 90, 31, 24, 1, 64, 12, 65, 5, 20, 3, 23, 25, 47]  # codons per record
MODELS = ("gpt2", "gpt_neox", "bert")
# tool, model, extra flags, the output file compared
RUNS = [("embed", "gpt2", [], "embeddings.npy"),
        ("embed", "gpt2", ["--pooling", "mean", "--layer", "final"], "embeddings.npy"),
        ("embed", "gpt_neox", ["--pooling", "genslm"], "embeddings.npy"),
        ("embed", "bert", [], "embeddings.npy"),
        ("embed", "bert", ["--pooling", "cls", "--layer", "1"], "embeddings.npy"),
        ("score", "gpt2", [], "scores.tsv"),
        ("score", "gpt_neox", ["--per_codon", "--score_unk"], "scores.tsv"),
        ("score", "bert", [], "scores.tsv"),
        ("score", "bert", ["--per_codon"], "scores.tsv")]


def model_dir(root: Path, name: str) -> Path:
    """A model_dir holding one checkpoint of a tiny untrained seeded model."""
    torch.manual_seed(0)
    cfg = tiny_config(name, max_position_embeddings=CONTEXT)
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, 1, {"model": build_model(cfg).state_dict(), "step": 1,
                              "params": yaml.safe_dump({"model": cfg.model_dump()})})
    return path


def records(path: Path) -> Path:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for k, codons in enumerate(LENGTHS):
            seq = "".join(rng.choice(list("ACGT"), size=3 * codons))
            if k % 4 == 1:
                seq = seq[:10] + "NNNN" + seq[14:]
            f.write(f">r{k}\n{seq}\n")
    return path


def run_name(tool: str, model: str, flags: list[str]) -> str:
    return "_".join([tool, model, *(f.lstrip("-") for f in flags)])


def run_tool(tool: str, model: Path, fasta: Path, out: Path, flags: list[str]) -> Path:
    """Run one tool in process; the path of its compared output."""
    from modelzoo.tools import embed, score
    if tool == "embed":
        argv = ["--output_dir", str(out)]
        compared = out / "embeddings.npy"
    else:
        argv = ["--output", str(out)]
        compared = out
    code = {"embed": embed, "score": score}[tool].main(["--model_dir", str(model), "--input", str(fasta), *argv,
                                                        *flags])
    assert code == 0
    return compared


def main() -> int:
    import tempfile
    SAVED.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fasta = records(root / "records.fasta")
        dirs = {name: model_dir(root / "models", name) for name in MODELS}
        for tool, model, flags, compared in RUNS:
            name = run_name(tool, model, flags)
            got = run_tool(tool, dirs[model], fasta, root / name, flags)
            (SAVED / f"{name}{Path(compared).suffix}").write_bytes(got.read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
