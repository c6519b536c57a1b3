"""Training throughput: ours vs HuggingFace transformers, same architecture, config and batch.

    python bench/bench_throughput.py [--steps 2] [--seq 2048] [--batch 2] [--only gptj:GPTNeoXForCausalLM:bf16]

GenSLM-25M (hidden 512, 8 layers, 8 heads, FFN 2048, vocab 69, hidden dropout 0.1), MSL 2048,
batch 2, fp32 and bf16 autocast, full train step (forward, backward, gradient clipping, AdamW).
Pairs: our GPT-J vs GPTJForCausalLM and vs GPTNeoXForCausalLM (rotary 25%), our GPT-2 vs
GPT2LMHeadModel, our BERT vs BertForMaskedLM. Each pair and precision runs in its own process:
both models are built there and their steps alternate (one warm-up each, then --steps timed
steps each); the best step of each side is kept, since load from other processes only ever slows
a step down. The bf16 and fp32 matmul peaks are measured in the same processes, between steps.
Model FLOPs utilisation (MFU) = model FLOPs per step / CPU seconds of the step / the matmul
peak (per CPU second) of the step's precision. In bf16 our model also runs with model.attention_in_fp32 (bf16 weight matmuls,
fp32 attention), a third side in the same alternation. Writes bench/results/throughput.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (attention_kind, codon_batch, hf_train_step, hf_twin, machine, markdown_table,  # noqa: E402
                    matmul_peak, our_config, our_train_step, run_worker, timed, train_flops, write_result)

PAIRS = [("gptj", "GPTJForCausalLM"), ("gptj", "GPTNeoXForCausalLM"), ("gpt2", "GPT2LMHeadModel"),
         ("bert", "BertForMaskedLM")]
PRECISIONS = ("bf16", "fp32")
TARGETS = {("gptj", "bf16"): 1.25, ("gpt2", "bf16"): 5.0}  # the targets (ours / theirs)
MFU_TARGET = 0.60
ATTN32 = "ours_attention_in_fp32"


def worker(ours_name: str, theirs_name: str, precision: str, steps: int, batch: int, seq: int) -> dict:
    bf16 = precision == "bf16"
    cfg = our_config(ours_name, seq, bf16)
    data = codon_batch(cfg, batch, seq)
    sides = {"ours": our_train_step(cfg, data)[0]}
    if bf16:  # the same model with attention_in_fp32 (bf16 weight matmuls, fp32 attention)
        sides[ATTN32] = our_train_step(our_config(ours_name, seq, bf16, attention_in_fp32=True), data)[0]
    twin = hf_twin(theirs_name, cfg)
    sides["theirs"] = hf_train_step(twin, data, bf16)[0]
    times = {side: [] for side in sides}
    peaks = {"bf16": [0.0, 0.0], "fp32": [0.0, 0.0]}  # FLOP per wall second, per CPU second
    for step in sides.values():  # warm-up: optimizer state, allocator, kernel selection
        step()
    for _ in range(steps):  # alternate, so every side sees the same machine load
        for side, step in sides.items():
            times[side].append(timed(step))
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            peaks[name] = [max(a, b) for a, b in zip(peaks[name], matmul_peak(dtype, cfg.hidden_size, batch * seq))]
    best = {side: [min(t[i] for t in times[side]) for i in (0, 1)] for side in times}  # [wall, cpu]
    return {"best": best, "times": times, "peaks": peaks, "flops": train_flops(cfg, batch, seq),
            "attention": attention_kind(twin)}


def profile(steps: int, batch: int, seq: int) -> None:
    """torch.profiler over our bf16 GPT-J step (after a warm-up): where the time goes, by op."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cfg = our_config("gptj", seq, True)
    step = our_train_step(cfg, codon_batch(cfg, batch, seq))[0]
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    rows = [("op", "share of the step (self time)", "calls")]
    rows += [(e.key, f"{e.self_cpu_time_total / total:.1%}", e.count) for e in ops[:15]]
    text = (f"torch.profiler, our GenSLM-25M GPT-J, bf16 autocast, MSL {seq}, batch {batch}, {steps} step(s) "
            f"after a warm-up; {machine()}.\n\n{markdown_table(rows)}")
    print(text)
    write_result("throughput_profile.md", "Where our bf16 training step spends its time",
                 "python bench/bench_throughput.py --profile", text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2, help="timed steps per side (after one warm-up)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--only", action="append", help="ours:theirs:precision, e.g. gptj:GPTNeoXForCausalLM:bf16")
    p.add_argument("--profile", action="store_true", help="profile our bf16 GPT-J step instead of comparing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.profile:
        profile(1, args.batch, args.seq)
        return
    if args.worker:
        ours, theirs, precision = args.worker.split(":")
        print(json.dumps(worker(ours, theirs, precision, args.steps, args.batch, args.seq)))
        return
    jobs = [f"{o}:{t}:{pr}" for pr in PRECISIONS for o, t in PAIRS]
    if args.only:
        jobs = [j for j in jobs if j in args.only]
    rows = [("ours", "transformers (attention)", "precision", "ours / theirs (CPU time)", "target",
             "ours / theirs (wall)", "ours tokens/s (wall)", "theirs tokens/s (wall)", "ours MFU", "theirs MFU")]
    peaks = {"bf16": [0.0, 0.0], "fp32": [0.0, 0.0]}
    tokens = args.batch * args.seq
    for job in jobs:
        ours, theirs, precision = job.split(":")
        r = run_worker(Path(__file__), ["--worker", job, "--steps", str(args.steps), "--batch", str(args.batch),
                                        "--seq", str(args.seq)])
        peaks = {k: [max(a, b) for a, b in zip(v, r["peaks"][k])] for k, v in peaks.items()}
        their_wall, their_cpu = r["best"]["theirs"]
        peak_cpu = r["peaks"][precision][1]
        for side in (s for s in r["best"] if s != "theirs"):
            our_wall, our_cpu = r["best"][side]
            target = TARGETS.get((ours, precision))
            ratio = their_cpu / our_cpu
            verdict = "" if target is None else f">= {target}x {'met' if ratio >= target else 'MISSED'}"
            name = ours if side == "ours" else f"{ours}, attention_in_fp32"
            rows.append((name, f"{theirs} ({r['attention']})", precision, f"{ratio:.2f}x", verdict,
                         f"{their_wall / our_wall:.2f}x", f"{tokens / our_wall:.0f}", f"{tokens / their_wall:.0f}",
                         f"{r['flops'] / our_cpu / peak_cpu:.0%}", f"{r['flops'] / their_cpu / peak_cpu:.0%}"))
        print(f"{job}: (wall s, cpu s) {r['times']}, peaks {r['peaks']}", flush=True)
    table = markdown_table(rows)
    header = (f"GenSLM-25M, MSL {args.seq}, batch {args.batch}, full train step (forward, backward, clipping, "
              f"AdamW), best of {args.steps} alternating steps per side after a warm-up; {machine()}. "
              f"The machine is shared, so ratios are of CPU time per step (the work done; wall-clock "
              f"ratios alongside). Matmul peak measured in the same processes (best of 2048^3 and the "
              f"model's projection shapes), per CPU second: bf16 {peaks['bf16'][1] / 1e9:.0f} GFLOP/s, fp32 "
              f"{peaks['fp32'][1] / 1e9:.0f} GFLOP/s (per wall second: {peaks['bf16'][0] / 1e9:.0f} and "
              f"{peaks['fp32'][0] / 1e9:.0f}). MFU = model FLOPs per CPU second of the step / that peak "
              f"for the row's precision (target >= {MFU_TARGET:.0%} in bf16).")
    print(header)
    print(table)
    command = "python bench/bench_throughput.py" + "".join(f" --only {j}" for j in args.only or [])
    path = write_result("throughput.md", "Training throughput vs transformers", command, f"{header}\n\n{table}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
