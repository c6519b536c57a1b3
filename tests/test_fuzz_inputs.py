"""Fuzzing every entry point with hostile inputs (issue 25): ``run.py --validate_only`` over
randomly mutated params files and flags, and every tool over randomly mutated arguments. Each
case must end with exit code 0 or 2 (a user error: one ``error:`` line), never an exception, a
traceback or another exit code. Seeded: a failure names its seed and case, and reruns the same.

Everything runs in this process (the entry points' ``main``), on a tiny model and inputs, so a
few hundred cases take seconds.
"""

from __future__ import annotations

import copy
import io
import math
import random
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_preparation import prepare_genomes
from modelzoo import cli
from modelzoo.models import build_model
from modelzoo.tools import convert_checkpoint, convert_params, embed, evaluate, generate, mutations, score
from modelzoo.training.checkpoint import save_checkpoint
from tests.helpers import DATA, tiny_config, tiny_params

SEED = 25
MODELZOO_PARAMS = DATA / "modelzoo" / "gpt2_sectioned.yaml"  # a Model Zoo file
PARAMS_CASES = 120
TOOL_CASES = 200

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: OpenMP wake-ups cost more than the math

# values a hostile or careless params file holds
YAML_VALUES = [None, -1, 0, 1, 3, 2 ** 64, 2 ** 70, -(2 ** 63), 1e308, math.nan, math.inf, -math.inf, "", "two",
               "a\0b", [], {}, [1, 2], True, "ATG", 0.5, {"x": 1}, "/nonexistent/dir", -0.5, "1e11"]
# values of a hostile or careless command line
ARG_VALUES = ["-1", "0", "1", "2", "nan", "inf", "-inf", "1e400", "18446744073709551616", "", "\0", "foo", "cuda",
              "meta", "/", "/nonexistent/x", ".", "..", "ATGNNN", "0.5", "-0.0", "1,2,3", "nan,0,1", "cpu", "true"]
RUN_FLAGS = ["--seed", "--max_steps", "--num_steps", "--model_dir", "--mode", "--checkpoint_path", "--steps",
             "--load_checkpoint_states", "--no_such_flag"]

def _paths(node, prefix=()) -> list[tuple]:
    """The path (keys and list indices) of every value under a params mapping, outermost first."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found.append(prefix + (key,))
        found += _paths(value, prefix + (key,))
    return found


def mutate_params(base: dict, rng: random.Random) -> tuple[dict, str]:
    """One mutation of a params mapping at any depth: (params, what it did)."""
    params = copy.deepcopy(base)
    path = rng.choice(_paths(params))
    *parents, last = path
    holder = params
    for key in parents:
        holder = holder[key]
    name = ".".join(map(str, path))
    kind = rng.choice(["value", "value", "value", "drop", "unknown"])
    if kind == "drop" and isinstance(holder, dict):
        del holder[last]
        return params, f"del {name}"
    if kind == "unknown" and isinstance(holder, dict):
        holder["num_layerz"] = 2
        return params, f"{'.'.join(map(str, parents + ['num_layerz']))} = 2"
    holder[last] = rng.choice(YAML_VALUES)
    return params, f"{name} = {holder[last]!r}"


def mutate_argv(argv: list[str], flags: list[str], rng: random.Random) -> tuple[list[str], str]:
    """One or two mutations of a tool's arguments: a value replaced, a flag dropped or added."""
    argv = list(argv)
    done = []
    for _ in range(rng.choice([1, 1, 2])):
        kind = rng.choice(["value", "value", "drop", "add"])
        values = [i for i in range(1, len(argv)) if argv[i - 1].startswith("--") and not argv[i].startswith("--")]
        if kind == "value" and values:
            i = rng.choice(values)
            argv[i] = rng.choice(ARG_VALUES)
            done.append(f"{argv[i - 1]} {argv[i]!r}")
        elif kind == "drop" and values:
            i = rng.choice(values)
            done.append(f"without {argv[i - 1]}")
            del argv[i - 1: i + 1]
        else:
            flag, value = rng.choice(flags), rng.choice(ARG_VALUES)
            argv += [flag, value]
            done.append(f"+ {flag} {value!r}")
    return argv, "; ".join(done)


def outcome(main, argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of an entry point's main in this process; an exception propagates."""
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's refusals
            code = e.code
    return code, err.getvalue()


def assert_clean(code, err: str, case: str) -> None:
    assert code in (0, 2), f"{case}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err, f"{case}: traceback\n{err[-2000:]}"
    if code == 2:
        assert any(line.startswith("error: ") for line in err.splitlines()), f"{case}: exit 2 without a message\n{err}"


@pytest.fixture(scope="module")
def world(tmp_path_factory, shards_msl64):
    """A tiny model_dir, a FASTA of short genes (one of them the reference), params for them."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    cfg = tiny_config(max_position_embeddings=32)
    (root / "md").mkdir()
    save_checkpoint(root / "md", 1, {"model": build_model(cfg).state_dict(), "step": 1,
                                     "params": yaml.safe_dump({"model": cfg.model_dump()})})
    rng = np.random.default_rng(0)
    genes = ["".join(rng.choice(list("ACGT"), size=3 * n)) for n in (12, 40, 12, 7)]
    (root / "genes.fasta").write_text("".join(f">g{k}\n{seq}\n" for k, seq in enumerate(genes)))
    (root / "ref.fasta").write_text(f">ref\n{genes[0]}\n")
    text = MODELZOO_PARAMS.read_text().replace("$SHARDS", str(shards_msl64)).replace("$MODEL_DIR", str(root / "mz"))
    (root / "modelzoo.yaml").write_text(text)
    return root, shards_msl64


def tool_cases(root: Path) -> dict:
    """Each tool's main, a working command line (outputs under OUT), and the flags it knows."""
    md, genes, ref, modelzoo = (str(root / name) for name in ("md", "genes.fasta", "ref.fasta", "modelzoo.yaml"))
    model = ["--model_dir", md, "--batch_size", "4", "--device", "cpu"]
    model_flags = ["--model_dir", "--checkpoint_path", "--device", "--batch_size", "--overwrite"]
    return {
        "generate": (generate.main, [*model, "--max_codons", "3", "--seed", "0", "--output", "OUT/g.fasta"],
                     model_flags + ["--num_sequences", "--prompt", "--temperature", "--top_k", "--top_p",
                                    "--max_codons", "--stop_at_stop_codon"]),
        "score": (score.main, [*model, "--input", genes, "--output", "OUT/s.tsv"],
                  model_flags + ["--input", "--per_codon"]),
        "embed": (embed.main, [*model, "--input", genes, "--output_dir", "OUT/e", "--no_map"],
                  model_flags + ["--input", "--layer", "--pooling", "--labels", "--label_column", "--bf16"]),
        "mutations": (mutations.main, [*model, "--input", genes, "--reference", ref, "--output_dir", "OUT/m",
                                       "--max_plots", "0"],
                      model_flags + ["--input", "--reference", "--max_plots"]),
        "prepare_genomes": (prepare_genomes.main, ["--input", genes, "--output_dir", "OUT/p", "--max_seq_length", "16",
                                                   "--split", "0.5,0.5,0", "--num_workers", "1"],
                            ["--seed", "--split", "--max_seq_length", "--min_codons", "--max_n_fraction",
                             "--windows_per_file", "--reading_frame", "--features", "--overwrite", "--pack_sequences"]),
        "convert_checkpoint": (convert_checkpoint.main, ["--to", "hf", "--model_dir", md, "--output_dir", "OUT/hf"],
                               ["--checkpoint_path", "--output_dir", "--overwrite", "--model_dir"]),
        "evaluate": (evaluate.main, [*model, "--output_dir", "OUT/ev", "--tasks", "perplexity", "--train_fasta", genes,
                                     "--eval_fasta", genes, "--max_order", "2"],
                     model_flags + ["--tasks", "--train_fasta", "--eval_fasta", "--max_order", "--seed",
                                    "--num_generated", "--generate_codons", "--temperature", "--kmer_sizes"]),
        "convert_params": (convert_params.main, ["--input", modelzoo, "--output", "OUT/params.yaml"],
                           ["--input", "--output", "--overwrite"]),
    }


def test_validate_only_over_mutated_params(world, tmp_path):
    root, shards = world
    base = tiny_params(shards, tmp_path / "md")
    base["runconfig"]["csx"] = {"memoryx": "disk", "memoryx_dir": str(tmp_path / "mx"), "keep_activations": "auto"}
    rng = random.Random(SEED)
    for n in range(PARAMS_CASES):
        params, what = mutate_params(base, rng)
        argv = [rng.choice(["CPU", "CPU", "GPU", "CSX"]), "--params", tmp_path / "p.yaml", "--validate_only"]
        if rng.random() < 0.3:
            more, flags = mutate_argv(["--mode", "train"], RUN_FLAGS, rng)
            argv += more
            what += f"; flags {flags}"
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
        code, err = outcome(cli.main, argv)
        assert_clean(code, err, f"params case {n} (seed {SEED}): {what}")
    assert not (tmp_path / "md").exists()  # validating writes nothing


def test_tools_over_mutated_arguments(world, tmp_path, monkeypatch):
    root, _ = world
    cases = tool_cases(root)
    for name, (main, base, _) in sorted(cases.items()):  # each mutation starts from a command that works
        out = tmp_path / f"base_{name}"
        out.mkdir()
        code, err = outcome(main, [a.replace("OUT", str(out)) if a.startswith("OUT/") else a for a in base])
        assert code == 0, f"{name}: {err}"
    rng = random.Random(SEED)
    codes = {0: 0, 2: 0}
    for n in range(TOOL_CASES):
        name = rng.choice(sorted(cases))
        main, base, flags = cases[name]
        argv, what = mutate_argv(base, flags, rng)
        out = tmp_path / f"case{n}"
        out.mkdir()
        argv = [str(a).replace("OUT", str(out)) if str(a).startswith("OUT/") else a for a in argv]
        monkeypatch.chdir(out)  # relative hostile paths ('.', '..') land in the case's own directory
        code, err = outcome(main, argv)
        assert_clean(code, err, f"tool case {n} (seed {SEED}): {name} {what}")
        codes[code] += 1
    assert codes[0] and codes[2]  # both outcomes were reached
