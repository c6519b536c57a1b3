"""prepare_genomes at GenSLM scale: peak memory and rate against input size and worker count.

    python bench/bench_data_scale.py [--sizes 0.1,1,5] [--workers 1,2] [--baseline DIR]

Gene FASTA of each size (nucleotides, gzipped) is made from the shipped E. coli K-12 CDS: copy
k of the 4,298 genes gets fresh ids (``syn{k}_{locus}``) and 1% of its bases replaced at random,
so no two copies are alike. Each preparation runs in a process of its own (MSL 2048, split
0.9/0.05/0.05), which reports its own peak RSS and that of its worker processes (the largest one
of them) and the CPU seconds of all of them. The per-core rate (nucleotides per CPU second, main
process and workers together) is set beside GenSLM's own path on the E. coli genes, measured in
the same run (bench_data_prep.py's genslm_path). --baseline DIR runs an older checkout of this
project on the same inputs (unpacked, its one process) for the before/after figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ECOLI = ROOT / "data" / "prokaryotic" / "ecoli_k12_mg1655_cds.fna.gz"
MSL = 2048


def synthesize(path: Path, nucleotides: float, seed: int = 0) -> tuple[int, int]:
    """Gene FASTA of about ``nucleotides`` nt from copies of the E. coli genes; (records, nt)."""
    import gzip

    from isal import igzip

    text = gzip.decompress(ECOLI.read_bytes())
    lines = text.split(b"\n")
    is_header = np.array([line.startswith(b">") for line in lines])
    base_nt = sum(len(line) for line, h in zip(lines, is_header) if not h)
    genes = int(is_header.sum())
    arr = np.frombuffer(text, dtype=np.uint8)
    # bases are the bytes of sequence lines: everything but header lines and line breaks
    line_of = np.cumsum(np.concatenate(([0], arr[:-1] == 10)))
    bases = np.flatnonzero(~is_header[line_of] & (arr != 10))
    rng = np.random.default_rng(seed)
    acgt = np.frombuffer(b"ACGT", dtype=np.uint8)
    copies = max(1, round(nucleotides / base_nt))
    with igzip.open(path, "wb", compresslevel=1) as out:
        for k in range(copies):
            copy = arr.copy()
            hit = bases[rng.random(len(bases)) < 0.01]
            copy[hit] = acgt[rng.integers(0, 4, len(hit))]
            out.write(copy.tobytes().replace(b"\n>", b"\n>syn%d_" % k).replace(b">", b">syn%d_" % k, 1)
                      if k else copy.tobytes())
    return copies * genes, copies * base_nt


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, as ru_maxrss keeps the launching process's peak across exec
    (subprocess starts this process by vfork + exec from the benchmark, which is larger)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(argv: list[str]) -> None:
    """Run one preparation in this process; print its figures as one JSON line."""
    source, *prepare_argv = argv
    sys.path.insert(0, source)
    from data_preparation import prepare_genomes
    wall, cpu = time.perf_counter(), time.process_time()
    report = prepare_genomes.prepare(prepare_genomes.parse_args(prepare_argv))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "wall": wall, "cpu": cpu + children.ru_utime + children.ru_stime,
        "rss_mib": peak_rss_mib(),
        "worker_rss_mib": children.ru_maxrss / 1024,
        "records": report["records_kept"],
        "windows": sum(s["windows"] for s in report["splits"].values()),
        "tokens": sum(s["tokens"] for s in report["splits"].values()),
    }))


def prepare_in_child(source: Path, fasta: Path, out: Path, options: list[str]) -> dict:
    argv = [sys.executable, __file__, "--worker", str(source), "--input", str(fasta), "--output_dir", str(out),
            "--max_seq_length", str(MSL), "--rename_duplicate_ids", "--overwrite", *options]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def genslm_rate() -> float:
    """GenSLM's path on the E. coli genes: nucleotides per CPU second (best of 2)."""
    from bench_data_prep import genslm_path, nucleotides
    from common import timed
    nt = nucleotides(ECOLI)
    return nt / min(timed(lambda: genslm_path(ECOLI))[1] for _ in range(2))


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # before importing common: torch would count in the worker's RSS
        return worker(sys.argv[2:])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine, markdown_table, write_result
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.1,1,5", help="GB (10^9 nucleotides) of genes")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--baseline", default=None, help="an older checkout to measure on the same inputs")
    parser.add_argument("--baseline_max_gb", type=float, default=1.0, help="largest size to run the baseline on")
    parser.add_argument("--workdir", default=None, help="where the synthetic inputs go (default: a temp dir)")
    args = parser.parse_args()
    sizes = [float(x) for x in args.sizes.split(",")]
    workers = [int(x) for x in args.workers.split(",")]
    theirs = genslm_rate()
    print(f"GenSLM path on E. coli genes: {theirs / 1e6:.2f} Mnt per CPU second", flush=True)
    rows = [("genes (nt)", "records", "version", "workers", "windows", "wall s", "CPU s", "Mnt/s per core",
             "per core / GenSLM", "Mnt/s wall", "peak RSS main MiB", "peak RSS worker MiB")]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for gb in sizes:
            fasta = Path(tmp) / f"genes_{gb:g}GB.fna.gz"
            records, nt = synthesize(fasta, gb * 1e9)
            print(f"{gb:g} GB: {records:,} genes, {nt:,} nt, {fasta.stat().st_size / 1e6:.0f} MB gzipped", flush=True)
            runs = [("packed", ROOT, w, ["--pack_sequences", "--num_workers", str(w)]) for w in workers]
            runs.append(("unpacked", ROOT, workers[0], ["--num_workers", str(workers[0])]))
            if args.baseline and gb <= args.baseline_max_gb:
                runs.append(("before (unpacked)", Path(args.baseline), 1, []))
            for version, source, w, options in runs:
                r = prepare_in_child(source, fasta, Path(tmp) / "out", options)
                rate = nt / r["cpu"]
                rows.append((f"{nt / 1e9:.2f} G", f"{records:,}", version, w, f"{r['windows']:,}", f"{r['wall']:.1f}",
                             f"{r['cpu']:.1f}", f"{rate / 1e6:.0f}", f"{rate / theirs:.0f}x",
                             f"{nt / r['wall'] / 1e6:.0f}", f"{r['rss_mib']:.0f}",
                             f"{r['worker_rss_mib']:.0f}" if w > 1 else "-"))
                print(markdown_table([rows[0], rows[-1]]).splitlines()[-1], flush=True)
            fasta.unlink()
    header = (f"Synthetic gene FASTA (gzipped) from the E. coli K-12 CDS, MSL {MSL}, split 0.9/0.05/0.05; each "
              f"preparation in its own process; CPU s = main process + workers; GenSLM's path on the same genes: "
              f"{theirs / 1e6:.2f} Mnt per CPU second; {machine()}.")
    table = markdown_table(rows)
    print(header)
    print(table)
    out = write_result("data_scale.md", "Data preparation at scale: memory and rate against input size and workers",
                       f"python bench/bench_data_scale.py --sizes {args.sizes} --workers {args.workers}"
                       + (" --baseline DIR" if args.baseline else ""), f"{header}\n\n{table}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
