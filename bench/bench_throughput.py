"""Training throughput: ours vs HuggingFace transformers, same architecture, config and batch.

    python bench/bench_throughput.py [--steps 3] [--seq 2048] [--batch 2] [--only gptj:GPTNeoXForCausalLM:bf16]

GenSLM-25M (hidden 512, 8 layers, 8 heads, FFN 2048, vocab 69, hidden dropout 0.1), MSL 2048,
batch 2, fp32 and bf16 autocast, full train step (forward, backward, gradient clipping, AdamW).
Pairs: our GPT-J vs GPTJForCausalLM and vs GPTNeoXForCausalLM (rotary 25%), our GPT-2 vs
GPT2LMHeadModel, our BERT vs BertForMaskedLM. Each pair and precision runs in its own process:
both models are built there and their steps alternate (one warm-up each, then --steps timed
steps each); the best step of each side is kept, since load from other processes only ever slows
a step down. The bf16 and fp32 matmul peaks are measured in the same processes, between steps.
Model FLOPs utilisation (MFU) = model FLOPs per step / step time / the matmul peak of the
step's precision. Writes bench/results/throughput.md.
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


def worker(ours_name: str, theirs_name: str, precision: str, steps: int, batch: int, seq: int) -> dict:
    bf16 = precision == "bf16"
    cfg = our_config(ours_name, seq, bf16)
    data = codon_batch(cfg, batch, seq)
    ours, our_params = our_train_step(cfg, data)
    twin = hf_twin(theirs_name, cfg)
    theirs, their_params = hf_train_step(twin, data, bf16)
    times = {"ours": [], "theirs": []}
    peaks = {"bf16": 0.0, "fp32": 0.0}
    ours(), theirs()  # warm-up: optimizer state, allocator, kernel selection
    for _ in range(steps):  # alternate, so both sides see the same machine load
        times["ours"].append(timed(ours))
        times["theirs"].append(timed(theirs))
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            peaks[name] = max(peaks[name], matmul_peak(dtype, cfg.hidden_size, batch * seq))
    flops = train_flops(cfg, batch, seq)
    return {"ours": min(times["ours"]), "theirs": min(times["theirs"]), "times": times, "peaks": peaks,
            "flops": flops, "attention": attention_kind(twin), "our_params": our_params,
            "their_params": their_params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--only", action="append", help="ours:theirs:precision, e.g. gptj:GPTNeoXForCausalLM:bf16")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        ours, theirs, precision = args.worker.split(":")
        print(json.dumps(worker(ours, theirs, precision, args.steps, args.batch, args.seq)))
        return
    jobs = [f"{o}:{t}:{pr}" for pr in PRECISIONS for o, t in PAIRS]
    if args.only:
        jobs = [j for j in jobs if j in args.only]
    rows = [("ours", "transformers (attention)", "precision", "ours tokens/s", "theirs tokens/s",
             "ours / theirs", "target", "ours MFU", "theirs MFU")]
    peaks = {"bf16": 0.0, "fp32": 0.0}
    tokens = args.batch * args.seq
    for job in jobs:
        ours, theirs, precision = job.split(":")
        r = run_worker(Path(__file__), ["--worker", job, "--steps", str(args.steps), "--batch", str(args.batch),
                                        "--seq", str(args.seq)])
        peaks = {k: max(v, r["peaks"][k]) for k, v in peaks.items()}
        peak = r["peaks"][precision]
        target = TARGETS.get((ours, precision))
        ratio = r["theirs"] / r["ours"]
        verdict = "" if target is None else f">= {target}x {'met' if ratio >= target else 'MISSED'}"
        rows.append((ours, f"{theirs} ({r['attention']})", precision, f"{tokens / r['ours']:.0f}",
                     f"{tokens / r['theirs']:.0f}", f"{ratio:.2f}x", verdict,
                     f"{r['flops'] / r['ours'] / peak:.0%}", f"{r['flops'] / r['theirs'] / peak:.0%}"))
        print(f"{job}: ours {r['times']['ours']} s, theirs {r['times']['theirs']} s, peaks {r['peaks']}", flush=True)
    table = markdown_table(rows)
    header = (f"GenSLM-25M, MSL {args.seq}, batch {args.batch}, full train step (forward, backward, clipping, "
              f"AdamW), best of {args.steps} alternating steps per side after a warm-up; {machine()}. "
              f"Measured matmul peak (best of 2048^3 and the model's projection shapes): "
              f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s. MFU is "
              f"against the peak of the row's precision (target >= {MFU_TARGET:.0%} in bf16).")
    print(header)
    print(table)
    command = "python bench/bench_throughput.py" + "".join(f" --only {j}" for j in args.only or [])
    path = write_result("throughput.md", "Training throughput vs transformers", command, f"{header}\n\n{table}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
