"""Long sequences: our GenSLM-25M GPT-J vs transformers' GPTNeoXForCausalLM, batch 1, bf16, at
MSL 2048, 4096 and 10,240; throughput and peak memory.

    python bench/bench_long_sequence.py [--seqs 2048,4096,10240] [--steps 1]

Every (model, MSL) trains in its own process (one warm-up step, then --steps timed steps), so
its peak RSS is its own; the processes alternate ours (default attention_in_fp32: auto, which is
fp32 attention on a CPU whose bf16 matmuls are slower than fp32) / ours with attention forced to bf16 / NeoX at each MSL. Peak memory has to grow linearly with MSL (attention through the flash kernel,
no L x L matrix): the table gives the peak RSS added per token over the shortest MSL, which stays
constant when it does. Writes bench/results/long_sequence.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (codon_batch, hf_train_step, hf_twin, machine, markdown_table, our_config,  # noqa: E402
                    our_train_step, peak_rss_mib, run_worker, timed, train_flops, write_result)

SIDES = {"ours": "ours (GPT-J), attention_in_fp32: auto", "ours_bf16_attention": "ours (GPT-J), attention_in_fp32: false",
         "neox": "GPTNeoXForCausalLM (sdpa)"}
TARGET = 1.2  # ours / NeoX at the longest MSL, the target


def worker(side: str, seq: int, steps: int) -> dict:
    cfg = our_config("gptj", seq, True, attention_in_fp32="auto" if side == "ours" else False)
    data = codon_batch(cfg, 1, seq)
    step = hf_train_step(hf_twin("GPTNeoXForCausalLM", cfg), data, True)[0] if side == "neox" \
        else our_train_step(cfg, data)[0]
    warm = timed(step)
    times = [timed(step) for _ in range(steps)]
    return {"wall": min(t[0] for t in times), "cpu": min(t[1] for t in times), "warm_up": warm,
            "peak_rss_mib": peak_rss_mib(), "flops": train_flops(cfg, 1, seq)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", default="2048,4096,10240")
    p.add_argument("--steps", type=int, default=1, help="timed steps per process, after one warm-up")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        side, seq = args.worker.split(":")
        print(json.dumps(worker(side, int(seq), args.steps)))
        return
    seqs = [int(s) for s in args.seqs.split(",")]
    results = {}
    for seq in seqs:
        for side in SIDES:
            results[side, seq] = r = run_worker(Path(__file__), ["--worker", f"{side}:{seq}", "--steps", str(args.steps)])
            print(f"{side} MSL {seq}: {r}", flush=True)
    lo, hi = seqs[0], seqs[-1]
    rows = [("MSL", "model", "tokens/s (wall)", "CPU s / step", "ours / NeoX (CPU time)", "ours / NeoX (wall)",
             "peak RSS (MiB)", f"KiB per token over MSL {lo:,}")]
    for seq in seqs:
        neox = results["neox", seq]
        for side, label in SIDES.items():
            r = results[side, seq]
            extra = r["peak_rss_mib"] - results[side, lo]["peak_rss_mib"]
            marginal = "" if seq == lo else f"{extra * 1024 / (seq - lo):.0f}"
            vs = "" if side == "neox" else f"{neox['cpu'] / r['cpu']:.2f}x"
            vs_wall = "" if side == "neox" else f"{neox['wall'] / r['wall']:.2f}x"
            rows.append((f"{seq:,}", label, f"{seq / r['wall']:.0f}", f"{r['cpu']:.1f}", vs, vs_wall,
                         f"{r['peak_rss_mib']:.0f}", marginal))
    longest = results["ours", hi], results["ours_bf16_attention", hi], results["neox", hi]
    best_ratio = longest[2]["cpu"] / longest[0]["cpu"]  # the default configuration's
    header = (f"GenSLM-25M GPT-J vs GPTNeoXForCausalLM (rotary 25%, transformers' default sdpa attention), batch 1, "
              f"bf16 autocast, AdamW with clipping; one process per row, best of {args.steps} timed step(s) after "
              f"a warm-up; {machine()}. Ratios are of CPU time per step (the machine is shared; wall-clock "
              f"alongside). Memory: the last column is the peak RSS added per extra token over the MSL {lo:,} run; "
              f"a constant means memory grows linearly with MSL (an L x L attention matrix would make it grow "
              f"with L). Target at MSL {hi:,}: >= {TARGET}x NeoX: ours (default) {best_ratio:.2f}x, "
              f"{'met' if best_ratio >= TARGET else 'MISSED'}.")
    table = markdown_table(rows)
    print(header)
    print(table)
    path = write_result("long_sequence.md", "Long sequences: throughput and memory vs MSL",
                        "python bench/bench_long_sequence.py" + (f" --seqs {args.seqs}" if args.seqs != "2048,4096,10240"
                                                                 else ""), f"{header}\n\n{table}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
