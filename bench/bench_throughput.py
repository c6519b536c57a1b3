"""Training throughput: ours vs HuggingFace transformers, same architecture, config and batch.

    python bench/bench_throughput.py [--steps 2] [--seq 2048] [--batch 2] [--only gptj:GPTNeoXForCausalLM:bf16]

GenSLM-25M (hidden 512, 8 layers, 8 heads, FFN 2048, vocab 69, hidden dropout 0.1), MSL 2048,
batch 2, fp32 and bf16 autocast, full train step (forward, backward, gradient clipping, AdamW).
Pairs: our GPT-J vs GPTJForCausalLM and vs GPTNeoXForCausalLM (rotary 25%), our GPT-2 vs
GPT2LMHeadModel (its default 'sdpa' attention, and 'eager': transformers' classic
quadratic-memory attention, which the issue's GPT-2 target assumed), our BERT vs
BertForMaskedLM. Each pair and precision runs in its own process:
both models are built there and their steps alternate (one warm-up each, then --steps timed
steps each); the best step of each side is kept, since load from other processes only ever slows
a step down. The bf16 and fp32 matmul peaks are measured in the same processes, between steps.
Model FLOPs utilisation (MFU) = model FLOPs per step / CPU seconds of the step / the matmul
peak (per CPU second) of the step's precision. Our model runs with its default
model.attention_in_fp32 ('auto': fp32 attention math on CPUs whose bf16 matmuls are slower than
fp32, the autocast dtype elsewhere); in bf16 it also runs with the opposite forced setting, a third side in the same
alternation (attention_in_fp32: false was the behaviour before 'auto'). Each row says which
precision each side's attention really computed in (recorded during the warm-up step).
Writes bench/results/throughput.md.

    python bench/bench_throughput.py --profile [--steps 2]

instead profiles the bf16 steps of our GPT-J (auto and forced) and GPTNeoXForCausalLM op by op,
alternating in one process, and writes bench/results/throughput_profile.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# As in the workers (common.run_worker): idle OpenMP threads sleep rather than spin, so the CPU
# time --profile reports is the work. OpenMP reads it when torch loads, hence before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import (attention_kind, attention_precision, codon_batch, hf_train_step, hf_twin,  # noqa: E402
                    machine, markdown_table, matmul_peak, our_config, our_train_step, run_worker, timed,
                    train_flops, write_result)
from modelzoo.models.layers import attention_in_fp32  # noqa: E402

PAIRS = [("gptj", "GPTJForCausalLM"), ("gptj", "GPTNeoXForCausalLM"), ("gpt2", "GPT2LMHeadModel"),
         ("gpt2", "GPT2LMHeadModel/eager"), ("bert", "BertForMaskedLM")]
PRECISIONS = ("bf16", "fp32")
TARGETS = {("gptj", "bf16"): 1.25, ("gpt2", "bf16"): 5.0}  # the targets (ours / theirs)
MFU_TARGET = 0.60
FORCED = "ours_forced"  # our model with the attention_in_fp32 setting 'auto' did not pick


def _not_chosen(cfg) -> bool:
    """The attention_in_fp32 setting that cfg's ('auto') does not pick for bf16 on this CPU."""
    return not attention_in_fp32(cfg.attention_in_fp32, torch.device("cpu"), torch.bfloat16)


def worker(ours_name: str, theirs_name: str, precision: str, steps: int, batch: int, seq: int) -> dict:
    bf16 = precision == "bf16"
    cfg = our_config(ours_name, seq, bf16)
    data = codon_batch(cfg, batch, seq)
    settings = {"ours": cfg.attention_in_fp32}
    sides = {"ours": our_train_step(cfg, data)[0]}
    if bf16:  # the same model with the attention precision 'auto' did not choose here
        forced = settings[FORCED] = _not_chosen(cfg)
        sides[FORCED] = our_train_step(our_config(ours_name, seq, bf16, attention_in_fp32=forced), data)[0]
    twin = hf_twin(theirs_name, cfg)
    sides["theirs"] = hf_train_step(twin, data, bf16)[0]
    times = {side: [] for side in sides}
    peaks = {"bf16": [0.0, 0.0], "fp32": [0.0, 0.0]}  # FLOP per wall second, per CPU second
    # warm-up (optimizer state, allocator, kernel selection), recording the attention precision
    attention = {side: attention_precision(step, seq) for side, step in sides.items()}
    for _ in range(steps):  # alternate, so every side sees the same machine load
        for side, step in sides.items():
            times[side].append(timed(step))
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            peaks[name] = [max(a, b) for a, b in zip(peaks[name], matmul_peak(dtype, cfg.hidden_size, batch * seq))]
    best = {side: [min(t[i] for t in times[side]) for i in (0, 1)] for side in times}  # [wall, cpu]
    return {"best": best, "times": times, "peaks": peaks, "flops": train_flops(cfg, batch, seq),
            "attention": attention_kind(twin), "precisions": attention, "settings": settings}


def profile(rounds: int, batch: int, seq: int) -> None:
    """torch.profiler over the bf16 train steps of our GPT-J (attention_in_fp32 auto, and forced
    to the other setting) and GPTNeoXForCausalLM, alternating in one process: per op, the self
    CPU time (best of ``rounds`` profiled steps after a warm-up) and the calls per step."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cfg = our_config("gptj", seq, True)
    data = codon_batch(cfg, batch, seq)
    forced = _not_chosen(cfg)
    sides = {f"ours ({cfg.attention_in_fp32})": our_train_step(cfg, data)[0],
             f"ours ({str(forced).lower()}, forced)":
                 our_train_step(our_config("gptj", seq, True, attention_in_fp32=forced), data)[0],
             "GPTNeoXForCausalLM": hf_train_step(hf_twin("GPTNeoXForCausalLM", cfg), data, True)[0]}
    precisions = {side: attention_precision(step, seq) for side, step in sides.items()}  # also the warm-up
    best: dict[str, dict[str, list]] = {side: {} for side in sides}  # op -> [self ms, calls]
    cpu = {side: float("inf") for side in sides}
    for _ in range(rounds):
        for side, step in sides.items():
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                cpu[side] = min(cpu[side], timed(step)[1])
            for e in prof.key_averages():
                ms = best[side].setdefault(e.key, [float("inf"), e.count])
                ms[0] = min(ms[0], e.self_cpu_time_total / 1e3)
    ops = sorted(set().union(*best.values()), key=lambda op: -max(b.get(op, [0])[0] for b in best.values()))
    rows = [("op", *(f"{side}, {precisions[side]} attention: self ms (calls)" for side in sides))]
    rows += [(op, *(f"{b[op][0]:.0f} ({b[op][1]})" if op in b else "-" for b in best.values())) for op in ops[:20]]
    rows.append(("**step CPU seconds (under the profiler)**", *(f"{cpu[side]:.2f}" for side in sides)))
    text = (f"torch.profiler, GenSLM-25M, bf16 autocast, MSL {seq}, batch {batch}; sides alternate in one "
            f"process, best of {rounds} profiled steps each after a warm-up; ours in parentheses: "
            f"model.attention_in_fp32; {machine()}.\n\n{markdown_table(rows)}")
    print(text)
    write_result("throughput_profile.md", "Where the bf16 training step spends its time: ours vs GPT-NeoX",
                 "python bench/bench_throughput.py --profile", text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2, help="timed steps per side (after one warm-up)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--only", action="append", help="ours:theirs:precision, e.g. gptj:GPTNeoXForCausalLM:bf16")
    p.add_argument("--profile", action="store_true",
                   help="profile our bf16 GPT-J and GPTNeoXForCausalLM steps op by op instead of timing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.profile:
        profile(args.steps, args.batch, args.seq)
        return
    if args.worker:
        ours, theirs, precision = args.worker.split(":")
        print(json.dumps(worker(ours, theirs, precision, args.steps, args.batch, args.seq)))
        return
    jobs = [f"{o}:{t}:{pr}" for pr in PRECISIONS for o, t in PAIRS]
    if args.only:
        jobs = [j for j in jobs if j in args.only]
    rows = [("ours (model.attention_in_fp32)", "transformers (attention)", "precision",
             "attention math ours / theirs", "ours / theirs (CPU time)", "target",
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
            setting = str(r["settings"][side]).lower()
            name = f"{ours} ({setting})" if side == "ours" else f"{ours} ({setting}, forced)"
            rows.append((name, f"{theirs.partition('/')[0]} ({r['attention']})", precision,
                         f"{r['precisions'][side]} / {r['precisions']['theirs']}", f"{ratio:.2f}x", verdict,
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
    defaults = {"steps": 2, "seq": 2048, "batch": 2}
    command = "python bench/bench_throughput.py" + "".join(
        f" --{k} {getattr(args, k)}" for k, v in defaults.items() if getattr(args, k) != v)
    command += "".join(f" --only {j}" for j in args.only or [])
    path = write_result("throughput.md", "Training throughput vs transformers", command, f"{header}\n\n{table}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
