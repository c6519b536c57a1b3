"""Opening a shard set of many records: format version 2 (record table beside a small manifest)
against version 1 (every record listed in manifest.json), peak RSS and seconds.

    python bench/bench_manifest_open.py [--records 1000000] [--output bench/results/manifest_open.md]

One synthetic set (ids ``gene_0000000`` ..., one 8-codon window each, written by ShardWriter) is
opened as it was written and again after its records are moved into the manifest as version 1
listed them. Each opening runs in a fresh process: import, ``ShardSet(dir, verify=False)`` (what
a run's start costs before any batch), then the last record's id and the windows' total (what a
reader asks of the table). The process reports its peak RSS (ru_maxrss) and the seconds of the
opening alone; the baseline row is the same process opening nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, resource, sys, time
from modelzoo.data.shards import ShardSet
start = time.perf_counter()
if sys.argv[1] != "-":
    shards = ShardSet(sys.argv[1], verify=False)
    last, windows = shards.records.id(len(shards.records) - 1), int(shards.records.num_windows.sum())
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_set(out: Path, n: int) -> None:
    from modelzoo.data.shards import ShardWriter
    from modelzoo.data.tokenizer import CodonTokenizer
    block = 1 << 17
    with ShardWriter(out, 8, CodonTokenizer(), windows_per_file=1 << 20, command="bench_manifest_open") as w:
        for lo in range(0, n, block):
            ids = [f"gene_{i:07d}" for i in range(lo, min(n, lo + block))]
            w.add_many(ids, np.ones(len(ids), np.int64), np.full((len(ids), 8), 5, np.uint8))


def as_version_1(src: Path, dst: Path) -> None:
    """``src`` rewritten as format version 1: the records listed in manifest.json, one a line."""
    from modelzoo.data.shards import ShardSet
    dst.mkdir()
    for f in src.glob("tokens_*.npy"):
        (dst / f.name).symlink_to(f)
    m = json.loads((src / "manifest.json").read_text())
    entries = ShardSet(src, verify=False).records.entries()
    del m["num_records"]
    m["records"] = "@RECORDS@"
    m["format_version"] = 1
    head, tail = json.dumps(m, indent=1).split('"@RECORDS@"')
    with open(dst / "manifest.json", "w") as out:
        out.write(head + "[\n  " + ",\n  ".join(map(json.dumps, entries)) + "\n ]" + tail)


def measure(path: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, path], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--output", default=None, help="also write the table (markdown) here")
    args = p.parse_args()
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        new, old = Path(tmp) / "v2", Path(tmp) / "v1"
        start = time.perf_counter()
        write_set(new, args.records)
        written = time.perf_counter() - start
        as_version_1(new, old)
        sizes = {"v2": sum(f.stat().st_size for f in new.iterdir() if not f.name.startswith("tokens_")),
                 "v1": (old / "manifest.json").stat().st_size}
        rows = {"nothing opened (import only)": measure("-")}
        rows["format 2: manifest + records.npy + record_ids.bin"] = measure(str(new))
        rows["format 1: records listed in manifest.json"] = measure(str(old))
        manifest_v2 = (new / "manifest.json").stat().st_size
    lines = [f"# Opening a shard set of {args.records:,} records", "",
             f"CPU: {cpu}. Set written by ShardWriter in {written:.1f} s. Record metadata on disk: format 2 "
             f"{sizes['v2'] / 2**20:.1f} MiB (manifest.json {manifest_v2:,} bytes), format 1 manifest.json "
             f"{sizes['v1'] / 2**20:.1f} MiB.", "",
             "| opened | peak RSS (MiB) | seconds |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['peak_rss_mib']:.0f} | {r['seconds']:.2f} |" for name, r in rows.items()]
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
