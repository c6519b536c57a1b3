"""Genomes -> token shards: this project's prepare_genomes vs GenSLM's own tokenisation path.

    python bench/bench_data_prep.py [--repeats 5]

GenSLM's path (genslm/dataset.py): Biopython SeqIO reads each record, the sequence is cut into
codons joined by spaces, and a transformers PreTrainedTokenizerFast with GenSLM's 69-token file
encodes it, padded to the block. GenSLM truncates every sequence to one block; to compare equal
work we let it encode the whole sequence and cut the ids into padded blocks the way ours does, so
both produce every window of every genome. Ours is the complete CLI path, shards written to disk,
on one core (--num_workers 1: the per-core rate; bench_data_scale.py measures more workers). The
genes are also prepared with --pack_sequences (every codon in a window, far fewer windows written).
Each path runs in processes of its own, same inputs, alternating; nucleotides per CPU second and
the ratio.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, markdown_table, run_worker, timed, write_result  # noqa: E402
from data_preparation import prepare_genomes  # noqa: E402
from modelzoo.data.tokenizer import PACKAGED_JSON  # noqa: E402

ECOLI = ROOT / "data" / "prokaryotic" / "ecoli_k12_mg1655_cds.fna.gz"
DATASETS = {  # name: (file, our options)
    "SARS-CoV-2 (418 genomes)": (ROOT / "data" / "sars_cov_2" / "nextstrain_2020_example_sequences.fasta.gz", []),
    "E. coli K-12 CDS (4,298 genes)": (ECOLI, []),
    "E. coli K-12 CDS, ours packed": (ECOLI, ["--pack_sequences"]),
}
BLOCK = 2048
TARGET = 80  # the target, ours / GenSLM


def genslm_path(path: Path) -> int:
    from Bio import SeqIO
    from transformers import PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(PACKAGED_JSON))
    tokenizer.pad_token = "[PAD]"
    opener = gzip.open if path.suffix == ".gz" else open
    windows = 0
    with opener(path, "rt") as handle:
        for record in SeqIO.parse(handle, "fasta"):
            seq = str(record.seq).upper()
            text = " ".join(seq[i:i + 3] for i in range(0, len(seq) - len(seq) % 3, 3))
            ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.uint8)
            n = -(-len(ids) // BLOCK)
            block = np.full((n, BLOCK), tokenizer.pad_token_id, dtype=np.uint8)
            block.reshape(-1)[: len(ids)] = ids
            windows += n
    return windows


def our_path(path: Path, out: Path, options=()) -> int:
    args = prepare_genomes.parse_args(["--input", str(path), "--output_dir", str(out),
                                       "--max_seq_length", str(BLOCK), "--split", "1,0,0",
                                       "--rename_duplicate_ids", "--num_workers", "1", *options])
    report = prepare_genomes.prepare(args)
    return report["splits"]["train"]["windows"]


def nucleotides(path: Path) -> int:
    with gzip.open(path, "rb") as fh:
        return sum(len(line.strip()) for line in fh if not line.startswith(b">"))


def best_times(path: Path, options: list[str], repeats: int) -> list[tuple[float, float]]:
    """Best (wall, CPU) seconds of GenSLM's path and ours on ``path``: each in processes of its
    own (a path's threads, e.g. the tokenizers library's pool, must not bill the other), the two
    alternating, ``repeats`` runs a process, two processes each."""
    times = {"genslm": [], "ours": []}
    for _ in range(2):
        for which, out in times.items():
            out += run_worker(Path(__file__), ["--worker", which, str(path), str(repeats), *options])["times"]
    return [(min(w for w, _ in t), min(c for _, c in t)) for t in times.values()]


def worker(which: str, path: str, repeats: str, *options: str) -> None:
    """Time one path ``repeats`` times in this process (ours writes into a fresh directory each
    time; deleting it is not timed)."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(lambda: genslm_path(Path(path))) if which == "genslm" else
                (lambda i=i: our_path(Path(path), Path(tmp) / f"out{i}", options)) for i in range(int(repeats))]
        print(json.dumps({"times": [timed(run) for run in runs]}))


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(*sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [("data set", "nucleotides", "GenSLM path Mnt/s", "ours Mnt/s", "ours / GenSLM (CPU time)", "target",
             "ours / GenSLM (wall)")]
    for name, (path, options) in DATASETS.items():
        if not path.exists():
            print(f"skipping {name}: {path} not found")
            continue
        nt = nucleotides(path)
        (their_wall, theirs), (our_wall, ours) = best_times(path, options, args.repeats)
        ratio = theirs / ours
        rows.append((name, f"{nt:,}", f"{nt / theirs / 1e6:.2f}", f"{nt / ours / 1e6:.1f}", f"{ratio:.0f}x",
                     f">= {TARGET}x {'met' if ratio >= TARGET else 'MISSED'}", f"{their_wall / our_wall:.0f}x"))
    header = (f"Processes of their own, alternating, best of 2 x {args.repeats} runs each; nucleotides per CPU "
              f"second of the process (the machine is shared: wall-clock ratios alongside); {machine()}.")
    table = markdown_table(rows)
    print(header)
    print(table)
    out = write_result("data_prep.md", "Data preparation: genomes -> shards", "python bench/bench_data_prep.py",
                       f"{header}\n\n{table}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
