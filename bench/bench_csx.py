"""CSX (emulated weight streaming, RAM MemoryX) vs the resident CPU backend, side by side.

    python bench/bench_csx.py [--steps 4] [--batch 2] [--seq 2048]

GenSLM-25M-shaped GPT-J (GPT-2 of the same size when GPT-J is not registered), bf16 mixed
precision, AdamW with clipping. Each backend trains in its own subprocess (so its peak RSS is its
own), alternating, after one warm-up step; prints a table and writes
bench/results/csx_vs_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def raw_params(seq: int, batch: int, memoryx_dir: str) -> dict:
    from modelzoo.models import MODELS
    name = "gptj" if "gptj" in MODELS else "gpt2"
    model = {"name": name, "hidden_size": 512, "num_hidden_layers": 8, "num_heads": 8, "filter_size": 2048,
             "max_position_embeddings": seq, "dropout_rate": 0.1, "attention_dropout_rate": 0.1,
             "mixed_precision": True, "fp16_type": "bfloat16"}
    if name == "gptj":
        model["rotary_dim"] = 16
    return {"model": model,
            "optimizer": {"optimizer_type": "AdamW", "learning_rate": 1e-4, "weight_decay": 0.01,
                          "max_gradient_norm": 1.0},
            "runconfig": {"mode": "eval", "model_dir": memoryx_dir, "csx": {"memoryx": "ram", "prefetch_depth": 1}}}


def worker(kind: str, steps: int, batch: int, seq: int) -> dict:
    import torch
    from modelzoo.backends.csx import CSXBackend
    from modelzoo.backends.resident import ResidentBackend
    from modelzoo.config import Params
    from modelzoo.models import build_model

    params = Params.model_validate(raw_params(seq, batch, "/tmp/bench_csx_model_dir"))
    params.runconfig.mode = "train"
    torch.manual_seed(0)
    model = build_model(params.model)
    backend = ResidentBackend("cpu") if kind == "cpu" else CSXBackend(params)
    backend.setup(model, params.optimizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 69, (batch, seq), generator=g)
    mb = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "attention_mask": torch.ones_like(ids)}
    backend.train_step([mb], 1e-4)  # warm-up: allocations, optimizer state
    start = time.perf_counter()
    losses = [backend.train_step([mb], 1e-4)["loss"] for _ in range(steps)]
    elapsed = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "model": params.model.name, "steps_per_s": steps / elapsed,
            "tokens_per_s": steps * batch * seq / elapsed, "peak_rss_mib": peak_kib / 1024,
            "parameters": sum(p.numel() for p in build_model(params.model).parameters()), "loss": losses[-1]}


def run_worker(kind: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--steps", str(args.steps),
                          "--batch", str(args.batch), "--seq", str(args.seq)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=2, help="alternating CPU/CSX rounds; the best of each is kept")
    p.add_argument("--worker", choices=("cpu", "csx"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.seq)))
        return
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for kind in ("cpu", "csx"):
            r = run_worker(kind, args)
            if kind not in best or r["tokens_per_s"] > best[kind]["tokens_per_s"]:
                best[kind] = r
    cpu, csx = best["cpu"], best["csx"]
    ratio = csx["tokens_per_s"] / cpu["tokens_per_s"]
    rows = [("backend", "tokens/s", "steps/s", "peak RSS (MiB)"),
            ("CPU (resident)", f"{cpu['tokens_per_s']:.0f}", f"{cpu['steps_per_s']:.3f}", f"{cpu['peak_rss_mib']:.0f}"),
            ("CSX (RAM MemoryX)", f"{csx['tokens_per_s']:.0f}", f"{csx['steps_per_s']:.3f}", f"{csx['peak_rss_mib']:.0f}"),
            ("CSX / CPU", f"{ratio:.3f}", f"{csx['steps_per_s'] / cpu['steps_per_s']:.3f}",
             f"{csx['peak_rss_mib'] / cpu['peak_rss_mib']:.3f}")]
    table = "\n".join("| " + " | ".join(r) + " |" + ("\n|---|---|---|---|" if i == 0 else "") for i, r in enumerate(rows))
    header = (f"{cpu['model']} {cpu['parameters']:,} parameters, MSL {args.seq}, batch {args.batch}, bf16 mixed "
              f"precision, AdamW + clipping, {args.steps} timed steps after 1 warm-up, best of {args.rounds} "
              f"alternating rounds; {platform.processor() or platform.machine()}, "
              f"{__import__('os').cpu_count()} CPUs (shared)")
    print(header)
    print(table)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "csx_vs_cpu.md").write_text(
        f"# CSX vs CPU throughput\n\n`python bench/bench_csx.py`\n\n{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
