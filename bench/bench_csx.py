"""CSX (emulated weight streaming, RAM MemoryX) vs the resident CPU backend, side by side.

    python bench/bench_csx.py [--steps 4] [--batch 2] [--seq 2048]

GenSLM-25M GPT-J as configs/genslm/gptj_25M_msl2048.yaml defines it (bf16 mixed precision,
dropout 0.1, no attention dropout, so the flash attention path), AdamW with clipping. Each backend
trains in its own subprocess (so its peak RSS is its own), alternating, after one warm-up step;
CSX runs twice: with its defaults (csx.keep_activations: auto, which keeps activations on the
wafer when its plan says they fit, and the rows say what it chose) and forced to recompute each
stage in backward (keep_activations: false). The CSX rows also say where the time goes. Prints a table and writes bench/results/csx_vs_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OPTIMIZER, ROOT, machine, markdown_table, peak_rss_mib, run_worker, write_result  # noqa: E402


KINDS = ("cpu", "csx", "csx_recompute")  # csx: the defaults; csx_recompute: keep_activations false
LABELS = {"cpu": "CPU (resident)", "csx": "CSX (RAM MemoryX), defaults",
          "csx_recompute": "CSX (RAM MemoryX), keep_activations: false (recompute in backward)"}


def raw_params(seq: int, batch: int, memoryx_dir: str) -> dict:
    import yaml
    model = yaml.safe_load((ROOT / "configs" / "genslm" / "gptj_25M_msl2048.yaml").read_text())["model"]
    model["max_position_embeddings"] = seq
    return {"model": model,
            "optimizer": dict(OPTIMIZER),
            "runconfig": {"mode": "eval", "model_dir": memoryx_dir, "csx": {"memoryx": "ram", "prefetch_depth": 1}}}


def worker(kind: str, steps: int, batch: int, seq: int) -> dict:
    import torch
    from modelzoo.backends.csx import CSXBackend
    from modelzoo.backends.resident import ResidentBackend
    from modelzoo.config import Params
    from modelzoo.models import build_model

    params = Params.model_validate(raw_params(seq, batch, "/tmp/bench_csx_model_dir"))
    params.runconfig.mode = "train"
    if kind == "csx_recompute":
        params.runconfig.csx.keep_activations = False
    torch.manual_seed(0)
    model = build_model(params.model)
    backend = ResidentBackend("cpu") if kind == "cpu" else CSXBackend(params)
    backend.setup(model, params.optimizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 69, (batch, seq), generator=g)
    mb = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "attention_mask": torch.ones_like(ids)}
    backend.train_step([mb], 1e-4)  # warm-up: allocations, optimizer state
    warm = dict(getattr(backend, "phase_seconds", {}))
    start = time.perf_counter()
    losses = [backend.train_step([mb], 1e-4)["loss"] for _ in range(steps)]
    elapsed = time.perf_counter() - start
    phases = {}
    if kind != "cpu":  # where the timed steps went (the warm-up step excluded)
        total = dict(backend.phase_seconds)
        phases = {k: (total[k] - warm.get(k, 0.0)) / steps for k in total}
    chose = getattr(backend, "activations", "")
    return {"kind": kind, "phases": phases, "activations": chose, "model": params.model.name, "steps_per_s": steps / elapsed,
            "tokens_per_s": steps * batch * seq / elapsed, "peak_rss_mib": peak_rss_mib(),
            "parameters": sum(p.numel() for p in build_model(params.model).parameters()), "loss": losses[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3, help="alternating CPU/CSX rounds; the best of each is kept")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.seq)))
        return
    best: dict[str, dict] = {}
    round_ratios = []
    for _ in range(args.rounds):
        this = {}
        for kind in KINDS:
            r = this[kind] = run_worker(Path(__file__), ["--worker", kind, "--steps", str(args.steps),
                                                         "--batch", str(args.batch), "--seq", str(args.seq)])
            if kind not in best or r["tokens_per_s"] > best[kind]["tokens_per_s"]:
                best[kind] = r
        round_ratios.append({k: this[k]["tokens_per_s"] / this["cpu"]["tokens_per_s"] for k in KINDS[1:]})
        print("round: " + ", ".join(f"{k} {this[k]['tokens_per_s']:.1f} tokens/s" for k in KINDS), flush=True)
    cpu = best["cpu"]
    rows = [("backend", "tokens/s", "steps/s", "peak RSS (MiB)", "/ CPU tokens/s (target >= 0.9)", "/ CPU peak RSS")]
    for kind in KINDS:
        r = best[kind]
        ratio = r["tokens_per_s"] / cpu["tokens_per_s"]
        rows.append((LABELS[kind], f"{r['tokens_per_s']:.0f}", f"{r['steps_per_s']:.3f}", f"{r['peak_rss_mib']:.0f}",
                     "" if kind == "cpu" else f"{ratio:.3f} ({'met' if ratio >= 0.9 else 'missed'})",
                     "" if kind == "cpu" else f"{r['peak_rss_mib'] / cpu['peak_rss_mib']:.3f}"))
    table = markdown_table(rows)
    header = (f"{cpu['model']} {cpu['parameters']:,} parameters, MSL {args.seq}, batch {args.batch}, bf16 mixed "
              f"precision, AdamW + clipping, {args.steps} timed steps after 1 warm-up, best of {args.rounds} "
              f"alternating rounds; {machine()}")
    for kind in KINDS[1:]:
        ph = best[kind]["phases"]
        table += (f"\n\n{LABELS[kind]}, time per step (best round): compute {ph['compute']:.2f} s, waiting for "
                  f"weights {ph['weights_wait']:.2f} s, gradients to MemoryX {ph['gradients_out']:.2f} s, optimizer "
                  f"{ph['optimizer']:.2f} s; weights read in the prefetch thread {ph['weights_read']:.2f} s "
                  f"(overlapped). Every round's ratio to CPU: " + ", ".join(f"{r[kind]:.3f}" for r in round_ratios)
                  + f". {best[kind]['activations'][:1].upper()}{best[kind]['activations'][1:]}.")
    print(header)
    print(table)
    write_result("csx_vs_cpu.md", "CSX vs CPU throughput", "python bench/bench_csx.py", f"{header}\n\n{table}")


if __name__ == "__main__":
    main()
