"""Packed gene windows: non-pad tokens/s, packed vs one record per window, and the kernels of
document attention.

    python bench/bench_packing.py [--steps 6] [--rounds 2] [--skip training|attention]

Training: E. coli K-12 genes (4,298 CDS, ~310 codons each) prepared at MSL 2048 by
prepare_genomes, once as before (one record per window, padded) and once with --pack_sequences;
GenSLM-25M GPT-NeoX trains on each through run.py's own path (modelzoo.cli, resident CPU
backend, fp32, batch 2, AdamW) in its own process, the two alternating for --rounds rounds.
Per side, over its steps after the first (warm-up): the trainer's own tokens_per_sec (positions
computed) and nonpad_tokens_per_sec (not [PAD]) per wall second as it logs them, and per CPU
second of each step (the steadier figure on a shared machine); the headline is non-pad tokens
per CPU second over an epoch (positions per CPU second x the set's share of real tokens), since
a few batches of one gene per window hold more or fewer codons than the average.

Attention: one layer's attention (8 heads of 64, fp32) forward, and forward + backward, over
the document layout of real packed windows: packed E. coli genes at MSL 2048 (batch 2) and
10,240 (batch 1), and one SARS-CoV-2 genome per 10,240 window. Kernels: ``segments`` (one fused
SDPA per document, the default), ``mask`` (one SDPA with a t x t boolean document mask), causal
SDPA over the whole window (no document attention: what packing without it costs), and
torch.nn.attention.flex_attention with a document block mask, eager (at 2,048 only: it
materialises every score) and under torch.compile (forward only: torch 2.13 has no flex
backward on CPU). Each kernel runs in its own process, so the peak RSS it adds over its inputs
is its own. Writes bench/results/packing.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (see common.run_worker)

from common import GENSLM_25M, OPTIMIZER, ROOT, machine, markdown_table, peak_rss_mib, run_worker, write_result  # noqa: E402

GENES = ROOT / "data" / "prokaryotic" / "ecoli_k12_mg1655_cds.fna.gz"
GENES_SHARED = Path("/work/shared/data/prokaryotic/ecoli_k12_mg1655_cds.fna.gz")
GENOMES = ROOT / "data" / "sars_cov_2" / "genbank_multiclade_sequences.fasta.gz"
MSL = 2048
BATCH = 2
SIDES = {"unpacked": "one record per window", "packed": "packed (pack_sequences, document attention)"}
KERNELS = {"segments": "segments: one SDPA per document (default)", "mask": "mask: t x t boolean document mask",
           "causal": "causal SDPA over the whole window (no document attention)",
           "flex": "flex_attention, eager (forward only)", "flex_compiled": "flex_attention, torch.compile (forward only)"}
LAYOUTS = {"genes_2048": ("packed E. coli genes", 2048, 2), "genes_10240": ("packed E. coli genes", 10240, 1),
           "genome_10240": ("one SARS-CoV-2 genome per window", 10240, 1)}
TARGET = 4.0  # the issue: packed / unpacked non-pad tokens/s


def genes_file() -> Path:
    return GENES if GENES.is_file() else GENES_SHARED


def codon_lengths(path: Path) -> list[int]:
    """Codons of every record of a FASTA (.gz): the lengths packing works with."""
    lengths, n = [], None
    with gzip.open(path, "rt") as fh:
        for line in fh:
            if line.startswith(">"):
                if n is not None:
                    lengths.append(n // 3)
                n = 0
            else:
                n += len(line.strip())
    return lengths + ([n // 3] if n is not None else [])


def packed_documents(lengths: list[int], seq: int, rows: int):
    """document_ids of the first ``rows`` windows that records of these lengths fill when packed
    as prepare_genomes --pack_sequences packs them (each record and its [SEP] one document,
    [PAD] -1; a record too long for a window fills windows of its own)."""
    import torch
    out, row, doc = [], [], 0
    for n in lengths:
        if n + 1 > seq:
            continue  # windows of their own: one document each, not what packing changes
        if len(row) + n + 1 > seq:
            out.append(row + [-1] * (seq - len(row)))
            row, doc = [], 0
            if len(out) == rows:
                break
        row += [doc] * (n + 1)
        doc += 1
    return torch.tensor(out[:rows])


# ---------------------------------------------------------------- attention kernels

def attention_worker(kernel: str, layout: str, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F
    from modelzoo.models.layers import document_mask, document_runs, segment_attention
    torch.manual_seed(0)
    _, seq, rows = LAYOUTS[layout]
    if layout.startswith("genes"):
        documents = packed_documents(codon_lengths(genes_file()), seq, rows)
    else:
        n = min(codon_lengths(GENOMES)[0], seq)
        documents = torch.tensor([[0] * n + [-1] * (seq - n)])
    heads, head_dim = GENSLM_25M["num_heads"], GENSLM_25M["hidden_size"] // GENSLM_25M["num_heads"]
    backward = not kernel.startswith("flex")  # torch 2.13: "FlexAttention does not support backward on CPU"
    q, k, v = (torch.randn(rows, heads, seq, head_dim, requires_grad=backward) for _ in range(3))

    if kernel == "segments":
        def attend():
            return segment_attention(q, k, v, document_runs(documents), True, 0.0)
    elif kernel == "mask":
        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(documents, True))
    elif kernel == "causal":
        def attend():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention) if kernel == "flex_compiled" else flex_attention

        def same_document(b, h, qi, ki):
            return (documents[b, qi] == documents[b, ki]) & (qi >= ki)

        def attend():
            mask = create_block_mask(same_document, rows, None, seq, seq, device="cpu")
            return flex(q, k, v, block_mask=mask)

    def forward():
        with torch.no_grad():
            attend()

    def forward_backward():
        attend().sum().backward()

    before = peak_rss_mib()
    start = time.perf_counter()
    (forward_backward if backward else forward)()  # warm-up (compiles flex_compiled)
    first = time.perf_counter() - start
    out = {"first": first, "documents": int(sum(len(r) for r in document_runs(documents))),
           "real_tokens": int((documents >= 0).sum()), "positions": documents.numel()}
    for name, fn in (("forward", forward), ("forward_backward", forward_backward if backward else None)):
        if fn is None:
            continue
        times = []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
        out[name] = {"wall": min(t[0] for t in times), "cpu": min(t[1] for t in times)}
    return out | {"added_rss_mib": peak_rss_mib() - before}


def attention_table(repeats: int) -> str:
    rows = [("window layout (MSL x batch)", "kernel", "forward: CPU s (wall s)", "forward + backward: CPU s (wall s)",
             "first call s", "peak RSS added (MiB)")]
    for layout, (what, seq, batch) in LAYOUTS.items():
        for kernel, label in KERNELS.items():
            if kernel == "flex" and seq > MSL:
                continue  # eager flex materialises every score (1 GB at 2,048; 11 GB and rising at 10,240)
            r = run_worker(Path(__file__), ["--worker", f"attention:{kernel}:{layout}", "--repeats", str(repeats)],
                           timeout=1800)
            print(f"{layout} {kernel}: {r}", flush=True)
            docs = (f"{what}, {seq:,} x {batch} ({r['documents']} document{'s' * (r['documents'] > 1)}, "
                    f"{r['real_tokens'] / r['positions']:.0%} real)")
            timing = [f"{r[k]['cpu']:.3f} ({r[k]['wall']:.3f})" if k in r else "not on CPU"
                      for k in ("forward", "forward_backward")]
            rows.append((docs, label, *timing, f"{r['first']:.1f}", f"{r['added_rss_mib']:.0f}"))
    return markdown_table(rows)


# ---------------------------------------------------------------- training: packed vs not

def prepare(out: Path, packed: bool) -> Path:
    from data_preparation.prepare_genomes import main as prepare_genomes
    argv = ["--input", str(genes_file()), "--output_dir", str(out), "--max_seq_length", str(MSL), "--seed", "0",
            "--rename_duplicate_ids"]  # ten locus tags appear twice (alternative start sites)
    if prepare_genomes(argv + (["--pack_sequences"] if packed else [])) not in (0, None):
        raise SystemExit(f"prepare_genomes {' '.join(argv)} failed")
    return out / "train"


def train_worker(side: str, data_dir: str, steps: int) -> dict:
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from modelzoo.backends.resident import ResidentBackend
    from modelzoo.cli import main as run
    from modelzoo.data.datasets import nonpad_tokens
    # CPU seconds and non-pad tokens of every train step (the trainer logs wall-clock rates; on a
    # shared machine the CPU time of the step is the steadier measure of its work)
    step_costs, train_step = [], ResidentBackend.train_step

    def counted(self, micro_batches, lr):
        cpu = time.process_time()
        out = train_step(self, micro_batches, lr)
        step_costs.append((time.process_time() - cpu, sum(nonpad_tokens(mb) for mb in micro_batches)))
        return out
    ResidentBackend.train_step = counted
    with tempfile.TemporaryDirectory() as tmp:
        params = {"train_input": {"data_dir": data_dir, "batch_size": BATCH, "max_seq_length": MSL,
                                  "pack_sequences": side == "packed", "shuffle_seed": 0},
                  "model": dict(GENSLM_25M, name="gpt_neox", max_position_embeddings=MSL),
                  "optimizer": OPTIMIZER,
                  "runconfig": {"model_dir": f"{tmp}/model", "max_steps": steps, "log_steps": 1, "seed": 0}}
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        if run(["CPU", "--params", str(path)]) != 0:
            raise SystemExit(f"training {side} failed")
        events = EventAccumulator(f"{tmp}/model/train")
        events.Reload()
        scalars = {tag: {e.step: e.value for e in events.Scalars(tag)}
                   for tag in ("tokens_per_sec", "nonpad_tokens_per_sec", "loss")}
    out = {tag: [values[s] for s in sorted(values) if s > 1] for tag, values in scalars.items()}
    return out | {"step_cpu": [cpu for cpu, _ in step_costs[1:]], "step_nonpad": [n for _, n in step_costs[1:]]}


def training_table(steps: int, rounds: int) -> tuple[str, dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {side: str(prepare(Path(tmp) / side, side == "packed")) for side in SIDES}
        from modelzoo.data.shards import ShardSet
        shards = {side: ShardSet(d, verify=False) for side, d in dirs.items()}
        real = {side: s.manifest["num_tokens"] / (len(s) * MSL) for side, s in shards.items()}
        windows = {side: len(s) for side, s in shards.items()}
        runs = {side: [] for side in SIDES}
        for r in range(rounds):
            for side in SIDES:  # alternate, so both sides see the same machine load
                out = run_worker(Path(__file__), ["--worker", f"train:{side}:{dirs[side]}", "--steps", str(steps)],
                                 timeout=3600)
                print(f"round {r + 1} {side}: {out}", flush=True)
                runs[side].append(out)
    rate = {}
    for side, outs in runs.items():
        cpu = [c for out in outs for c in out["step_cpu"]]
        nonpad = sum(n for out in outs for n in out["step_nonpad"])
        rate[side] = {"wall": statistics.median(v for out in outs for v in out["tokens_per_sec"]),
                      "wall_nonpad": statistics.median(v for out in outs for v in out["nonpad_tokens_per_sec"]),
                      "positions": statistics.median(BATCH * MSL / c for c in cpu),
                      "measured": nonpad / sum(cpu)}
        # a few batches of one gene per window hold more or fewer codons than the set's average:
        # over an epoch the non-pad rate is the position rate times the set's share of real tokens
        rate[side]["epoch"] = rate[side]["positions"] * real[side]
    ratio = {k: rate["packed"][k] / rate["unpacked"][k] for k in ("wall_nonpad", "measured", "epoch")}
    rows = [("windows", "train windows at MSL 2048", "real (non-[PAD]) positions",
             "trainer's tokens/s, wall (positions)", "trainer's non-pad tokens/s, wall", "positions per CPU s",
             "non-pad tokens per CPU s: the steps run / over an epoch", "non-pad tokens/s vs one record per window")]
    for side, label in SIDES.items():
        r = rate[side]
        gain = ("" if side == "unpacked" else f"**{ratio['epoch']:.2f}x** over an epoch (CPU); steps run: "
                f"{ratio['measured']:.2f}x (CPU), {ratio['wall_nonpad']:.2f}x (wall)")
        rows.append((label, f"{windows[side]:,}", f"{real[side]:.1%}", f"{r['wall']:.0f}", f"{r['wall_nonpad']:.0f}",
                     f"{r['positions']:.0f}", f"{r['measured']:.0f} / {r['epoch']:.0f}", gain))
    return markdown_table(rows), ratio, real["packed"] / real["unpacked"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="training steps per run (the first is the warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each side")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per attention kernel after a warm-up")
    p.add_argument("--skip", choices=("training", "attention"), action="append", default=[])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, a, b = args.worker.split(":", 2)
        out = attention_worker(a, b, args.repeats) if kind == "attention" else train_worker(a, b, args.steps)
        print(json.dumps(out))
        return
    parts = [f"{machine()}; the machine is shared, so both sides of each comparison alternate in one run."]
    if "training" not in args.skip:
        table, ratio, density = training_table(args.steps, args.rounds)
        verdict = "met" if ratio["epoch"] >= TARGET else "MISSED"
        parts += [f"## Training: E. coli genes at MSL {MSL}, packed vs one record per window\n\n"
                  f"GenSLM-25M GPT-NeoX (hidden 512, 8 layers), fp32, batch {BATCH}, resident CPU backend through "
                  f"run.py's path, {args.rounds} alternating runs of {args.steps} steps per side (the warm-up step "
                  f"excluded): medians of the trainer's logged per-step rates (wall clock) and of each step's "
                  f"positions per CPU second; non-pad tokens per CPU second over the steps run, and over an epoch "
                  f"(positions per CPU second x the set's real share: the few batches run hold more or fewer "
                  f"codons than the average). Packed / one record per window, non-pad tokens per CPU second over "
                  f"an epoch: **{ratio['epoch']:.2f}x** (issue's expectation >= {TARGET:.0f}x: {verdict}). Packing "
                  f"makes the windows {density:.1f}x denser; the rest is document attention doing less work than "
                  f"causal attention over a whole window (below).\n\n{table}"]
        print(parts[-1], flush=True)
    if "attention" not in args.skip:
        parts += ["## Document attention kernels\n\n"
                  f"One attention layer, 8 heads of 64, fp32, best of {args.repeats} calls after a warm-up, each "
                  f"kernel in its own process (peak RSS added over its q/k/v inputs). Real: the share of positions "
                  f"inside a document (the rest is [PAD]).\n\n{attention_table(args.repeats)}"]
        print(parts[-1], flush=True)
    command = "python bench/bench_packing.py" + "".join(f" --skip {s}" for s in args.skip)
    path = write_result("packing.md", "Packed gene windows and document attention", command, "\n\n".join(parts))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
