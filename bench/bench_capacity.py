"""Capacity: GenSLM-2.5B (GPT-J) trains on the CSX backend with disk MemoryX on a 24 GB machine,
and the largest GPT-J the resident CPU backend can train here, for contrast.

    python bench/bench_capacity.py csx [--work_dir /work/capacity] [--steps_2048 3] [--steps_10240 1]
    python bench/bench_capacity.py setup [--work_dir ...]
    python bench/bench_capacity.py resident [--work_dir ...] [--confirm]
    python bench/bench_capacity.py report [--work_dir ...]

``csx`` trains the 2.5B preset at MSL 2048 (steps_2048 steps), then resumes from its streamed
checkpoint at MSL 10,240 (steps_10240 steps); each run is a ``run.py CSX`` subprocess under
``/usr/bin/time -v`` (peak RSS), and the CSX backend's per-step log lines give the time per phase.
``resident`` measures the CPU backend's peak RSS on 2.5B-shaped GPT-Js with 1 and 2 blocks, fits
bytes per block, and (with --confirm) trains one step of the deepest one predicted to stay under
the RAM budget.
Each part writes a JSON next to its logs; ``report`` (also run after each part) writes
bench/results/capacity.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 2 ** 30
PRESETS = {2048: "configs/genslm/gptj_2.5B_msl2048.yaml", 10240: "configs/genslm/gptj_2.5B_msl10240.yaml"}
STEP_LINE = re.compile(r"step (\d+) \| loss ([\d.naninf]+) \| lr \S+ \| grad_norm ([\d.naninf]+)")
PHASE_LINE = re.compile(r"CSX step ([\d.]+) s: compute ([\d.]+) s, waiting for weights ([\d.]+) s, gradients to "
                        r"MemoryX ([\d.]+) s, optimizer ([\d.]+) s \(weights read from MemoryX ([\d.]+) s")


def run_timed(cmd: list[str], log_path: Path, once_loaded=None) -> dict:
    """Run cmd under /usr/bin/time -v; returns exit code, wall seconds and peak RSS.
    ``once_loaded()`` runs when the run's output says the starting checkpoint was loaded."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        while proc.poll() is None:
            time.sleep(5)
            if once_loaded and " loaded " in log_path.read_text(errors="replace"):
                once_loaded()
                once_loaded = None
    return timed_result(log_path)


def timed_result(log_path: Path) -> dict:
    """What /usr/bin/time -v reported at the end of log_path."""
    text = log_path.read_text(errors="replace")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    status = re.search(r"Exit status: (\d+)", text)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.group(1).split(":")))) if wall else None
    return {"exit_code": int(status.group(1)) if status else None, "wall_s": seconds,
            "peak_rss_gib": int(peak.group(1)) * 1024 / GiB if peak else None,
            "killed": "Command terminated by signal" in text}


def write_params(preset: str, path: Path, model_dir: Path, memoryx_dir: Path, batch: int | None, lr: float,
                 device: str = "CSX", model: dict | None = None) -> None:
    params = yaml.safe_load((ROOT / preset).read_text())
    params["runconfig"].update(mode="train", model_dir=str(model_dir), log_steps=1, checkpoint_steps=0,
                               max_checkpoints=1)
    if device == "CSX":
        params["runconfig"]["csx"] = {"memoryx": "disk", "memoryx_dir": str(memoryx_dir), "prefetch_depth": 1}
    if batch:
        params["train_input"]["batch_size"] = batch
    # A constant rate: a handful of steps must show the loss falling (the preset warms up over 100).
    params["optimizer"]["learning_rate"] = lr
    params["model"].update(model or {})
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def parse_run_log(model_dir: Path) -> dict:
    text = (model_dir / "run.log").read_text(errors="replace") if (model_dir / "run.log").exists() else ""
    steps = [{"step": int(m[0]), "loss": float(m[1]), "grad_norm": float(m[2])} for m in STEP_LINE.findall(text)]
    phases = [dict(zip(("total", "compute", "weights_wait", "gradients_out", "optimizer", "weights_read"),
                       map(float, m))) for m in PHASE_LINE.findall(text)]
    for s, p in zip(steps, phases):
        s.update(p)
    stamps = {}
    for line in text.splitlines():
        for key, marker in (("train_start", " training "), ("saved", " saved ")):
            if marker in line:
                stamps[key] = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
    return {"steps": steps, "log_stamps": stamps}


def part_csx(args) -> None:
    work = Path(args.work_dir)
    runs = []
    previous = None
    for msl, steps in ((2048, args.steps_2048), (10240, args.steps_10240)):
        if not steps:
            continue
        model_dir, params = work / f"gptj_2.5B_msl{msl}", work / f"gptj_2.5B_msl{msl}.yaml"
        write_params(PRESETS[msl], params, model_dir, work / "memoryx", args.batch_2048 if msl == 2048 else None,
                     args.lr, model={"mixed_precision": args.precision == "bf16"})
        cmd = [sys.executable, "run.py", "CSX", "--params", str(params), "--num_steps", str(steps)]
        if previous is not None:  # continue from the MSL 2048 run's streamed checkpoint
            cmd += ["--checkpoint_path", str(previous), "--load_checkpoint_states", "model,optimizer,scheduler"]
        log_path = work / f"msl{msl}.log"
        cleanup = None
        if previous is not None:
            def cleanup(old=previous):  # the disk holds one 30 GB checkpoint and one MemoryX at a time
                for f in (old, old.with_name(old.name + ".sha256")):
                    f.unlink(missing_ok=True)
        while log_path.exists() and "Exit status" not in log_path.read_text(errors="replace") \
                and _running_pid(msl) is not None:  # a run a previous driver started: wait for it
            time.sleep(30)
        if log_path.exists() and "Exit status: 0" in log_path.read_text(errors="replace"):
            print("reusing the finished run in", log_path, flush=True)  # e.g. after the driver was restarted
            result = timed_result(log_path)
        else:
            print("running:", " ".join(cmd), flush=True)
            result = run_timed(cmd, log_path, cleanup)
        result.update(parse_run_log(model_dir), msl=msl, batch=yaml.safe_load(params.read_text())["train_input"]
                      ["batch_size"], resumed_from=str(previous) if previous else None)
        runs.append(result)
        (work / "csx.json").write_text(json.dumps(runs, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "log_stamps"}, indent=1), flush=True)
        ckpts = sorted(model_dir.glob("checkpoint_*.mdl"))
        if result["exit_code"] != 0 or not ckpts:
            break
        previous = ckpts[-1]


def part_setup(args) -> None:
    """Only the CSX setup of GenSLM-2.5B with disk MemoryX: built on meta, initialised tensor by
    tensor into MemoryX; peak RSS and time (in a subprocess, so the peak is its own)."""
    work = Path(args.work_dir)
    params = work / "setup_2.5B.yaml"
    write_params(PRESETS[2048], params, work / "setup_model", work / "memoryx", 1, args.lr)
    code = ("import resource, sys, time, torch; sys.path.insert(0, '.');"
            "from modelzoo.backends.csx import CSXBackend; from modelzoo.config import load_params;"
            "from modelzoo.models import build_model;"
            f"p = load_params({str(params)!r}, {{}}); torch.manual_seed(p.runconfig.seed); t = time.perf_counter();"
            "b = CSXBackend(p); m = b.build_model(build_model, p.model); b.setup(m, p.optimizer);"
            "print('SETUP', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,"
            " sum(x.numel() for x in m.parameters()), flush=True); b.close()")
    result = run_timed([sys.executable, "-c", code], work / "setup.log")
    line = next(l for l in (work / "setup.log").read_text().splitlines() if l.startswith("SETUP"))
    _, seconds, peak, n = line.split()
    result.update(setup_s=float(seconds), setup_peak_gib=float(peak), parameters=int(n))
    (work / "setup.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def part_resident(args) -> None:
    """Peak RSS of one CPU training step of GenSLM-2.5B-shaped GPT-Js with 1 and 2 blocks gives the
    bytes per block (weights, gradients, Adam state, autocast copies, saved activations) and the
    fixed rest; --confirm then trains the deepest one predicted to fit the budget."""
    work = Path(args.work_dir)
    rows = json.loads((work / "resident.json").read_text()) if (work / "resident.json").exists() else []
    depths = [1, 2]
    if args.confirm:
        depths.append(None)
    for layers in depths:
        if layers is None:
            layers = args.confirm_layers or _fit(rows, args.budget_gib)["largest_layers"]
        if any(r["layers"] == layers and r["exit_code"] == 0 for r in rows):
            continue
        name = f"cpu_gptj_2.5B_shape_{layers}_layers"
        params = work / f"{name}.yaml"
        write_params(PRESETS[2048], params, work / name, work / "unused", args.batch_2048, args.lr, "CPU",
                     {"num_hidden_layers": layers})
        n = _parameters(params)
        print(f"resident CPU: {name}, {n:,} parameters", flush=True)
        result = run_timed([sys.executable, "run.py", "CPU", "--params", str(params), "--num_steps", "1"],
                           work / f"{name}.log")
        result.update(parse_run_log(work / name), parameters=n, name=name, layers=layers)
        rows.append(result)
        (work / "resident.json").write_text(json.dumps(rows, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "log_stamps"}, indent=1), flush=True)


def _parameters(params_path: Path) -> int:
    import torch
    from modelzoo.config import load_params
    from modelzoo.models import build_model
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(load_params(str(params_path), {}).model).parameters())


def _fit(rows: list[dict], budget_gib: float = 18.0) -> dict:
    """Least-squares line peak RSS = fixed + per_layer x blocks over the finished runs."""
    done = sorted((r["layers"], r["peak_rss_gib"] * GiB, r["parameters"]) for r in rows if r["exit_code"] == 0)
    n = len(done)
    mean_l = sum(d[0] for d in done) / n
    mean_r = sum(d[1] for d in done) / n
    per_layer = (sum((d[0] - mean_l) * (d[1] - mean_r) for d in done) /
                 sum((d[0] - mean_l) ** 2 for d in done))
    fixed = mean_r - per_layer * mean_l
    params_per_layer = (done[-1][2] - done[0][2]) / (done[-1][0] - done[0][0])
    layers = int((budget_gib * GiB - fixed) // per_layer)
    return {"per_layer": per_layer, "per_param": per_layer / params_per_layer, "fixed": fixed,
            "largest_layers": layers, "largest_params": done[0][2] + (layers - done[0][0]) * params_per_layer,
            "predicted": lambda blocks: fixed + per_layer * blocks}


def _running_pid(msl: int) -> int | None:
    """The live run.py training the MSL ``msl`` capacity run, if any."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"gptj_2.5B_msl{msl}.yaml" in cmd and "run.py" in cmd and "/usr/bin/time" not in cmd:
            return int(proc.name)
    return None


def csx_run(work: Path, msl: int) -> dict:
    """What the logs of the MSL ``msl`` run say, finished or still running."""
    params = yaml.safe_load((work / f"gptj_2.5B_msl{msl}.yaml").read_text())
    result = timed_result(work / f"msl{msl}.log")
    result.update(parse_run_log(Path(params["runconfig"]["model_dir"])), msl=msl,
                  batch=params["train_input"]["batch_size"])
    pid = _running_pid(msl)
    if result["exit_code"] is None and pid is not None:  # still running: its peak so far, from /proc
        result["status"] = f"running at {time.strftime('%H:%M')}, {len(result['steps'])} step(s) done"
        hwm = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        result["peak_rss_gib"] = int(hwm.group(1)) * 1024 / GiB
    else:
        result["status"] = "killed" if result["killed"] else f"exit code {result['exit_code']}"
    return result


def _precision_note(work: Path) -> str:
    """How the CSX runs computed and what learning rate they used, from their params."""
    params = yaml.safe_load((work / "gptj_2.5B_msl2048.yaml").read_text())
    precision = "bf16 autocast" if params["model"].get("mixed_precision") else "fp32"
    return (f"Batch 1, {precision} compute on the wafer, fp32 master weights and AdamW state in MemoryX, "
            f"constant learning rate {params['optimizer']['learning_rate']:g} (the first steps of a warm-up: "
            f"Adam's first steps move every weight by about the learning rate, which at 1e-5 and 1e-4 sent the "
            f"loss up).")


def report(args) -> None:
    work = Path(args.work_dir)
    lines = ["# Capacity: GenSLM-2.5B on CSX (disk MemoryX) vs the resident CPU backend", "",
             "`python bench/bench_capacity.py csx`, then `python bench/bench_capacity.py resident "
             "--confirm` (2 CPU cores, 24 GB RAM, no swap)", ""]
    runs = [csx_run(work, msl) for msl in (2048, 10240) if (work / f"msl{msl}.log").exists()]
    if runs:
        lines += ["## GenSLM-2.5B (GPT-J, hidden 3840, 28 layers, 32 heads, FFN 4096), CSX, disk MemoryX", "",
                  f"{_precision_note(work)} Seconds per step and per phase, from the CSX backend's per-step "
                  "log line:", "",
                  "| MSL x batch | step | loss | grad norm | s/step | compute | waiting for weights | "
                  "gradients to MemoryX | optimizer (MemoryX) | weights read (overlapped) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            for st in r["steps"]:
                lines.append(f"| {r['msl']} x {r['batch']} | {st['step']} | {st['loss']:.4f} | {st['grad_norm']:.3f} | "
                             + " | ".join(f"{st.get(k, float('nan')):.0f}" for k in
                                          ("total", "compute", "weights_wait", "gradients_out", "optimizer",
                                           "weights_read")) + " |")
        lines += ["", "| run | status | peak RSS (GiB) | wall (s) |", "|---|---|---|---|"]
        for r in runs:
            rss = f"{r['peak_rss_gib']:.2f}" if r["peak_rss_gib"] is not None else "?"
            wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "?"
            lines.append(f"| MSL {r['msl']} | {r['status']} | {rss} | {wall} |")
        lines.append("")
    if (work / "setup.json").exists():
        r = json.loads((work / "setup.json").read_text())
        lines += [f"CSX setup alone (`python bench/bench_capacity.py setup`): GenSLM-2.5B, {r['parameters']:,} "
                  f"parameters, built on the meta device and initialised tensor by tensor into disk MemoryX in "
                  f"{r['setup_s']:.0f} s with a peak RSS of {r['peak_rss_gib']:.2f} GiB.", ""]
    if (work / "resident.json").exists():
        rows = json.loads((work / "resident.json").read_text())
        fit = _fit(rows, args.budget_gib) if sum(1 for r in rows if r["exit_code"] == 0) >= 2 else None
        lines += ["## Resident CPU backend: GenSLM-2.5B-shaped GPT-J (hidden 3840, FFN 4096) with fewer blocks, "
                  f"MSL 2048 x {args.batch_2048}, bf16 autocast, AdamW, one training step", "",
                  "| blocks | parameters | peak RSS (GiB) | fit (GiB) | wall, whole run (s) | exit code |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            predicted = f"{fit['predicted'](r['layers']) / GiB:.2f}" if fit else ""
            lines.append(f"| {r['layers']} | {r['parameters']:,} | {r['peak_rss_gib']:.2f} | {predicted} | "
                         f"{r['wall_s']:.0f} | {r['exit_code']} |")
        if fit:
            lines += ["", f"Least-squares fit over these runs: {fit['per_layer'] / GiB:.2f} GiB per block "
                          f"({fit['per_param']:.1f} bytes per parameter: fp32 weights, gradients and Adam state, "
                          f"bf16 autocast copies, saved activations) + {fit['fixed'] / GiB:.2f} GiB fixed. Under a "
                          f"{args.budget_gib:g} GiB budget the largest resident GPT-J of this shape has "
                          f"{fit['largest_layers']} blocks, {fit['largest_params'] / 1e9:.2f} B parameters "
                          f"(GenSLM-2.5B has 28 blocks)."]
        lines.append("")
    out = ROOT / "bench" / "results" / "capacity.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("csx", "setup", "resident", "report"))
    p.add_argument("--work_dir", default="/work/capacity")
    p.add_argument("--steps_2048", type=int, default=3)
    p.add_argument("--steps_10240", type=int, default=1)
    p.add_argument("--batch_2048", type=int, default=1, help="MSL 2048 batch (the preset's is 2)")
    # Adam's first steps move every weight by about the learning rate: at 1e-4 and 1e-5 the 2.5B
    # model's loss went up (4.88 -> 12.66 and -> 6.74 at step 2); 1e-6 is where a warm-up starts
    p.add_argument("--lr", type=float, default=1e-6)
    # On a CPU whose bf16 matmuls are slower than fp32 (the Xeon these ran on) fp32 outruns bf16: see
    # bench_throughput's peak rows (an AMD Zen 4 is the other way round: bench_whole_path).
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="CSX runs: compute precision")
    p.add_argument("--budget_gib", type=float, default=18.0, help="RAM one training process may use here")
    p.add_argument("--confirm", action="store_true", help="resident: also train the predicted largest GPT-J")
    p.add_argument("--confirm_layers", type=int, help="resident: confirm with this many blocks instead")
    args = p.parse_args()
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    if args.part == "csx":
        part_csx(args)
    elif args.part == "setup":
        part_setup(args)
    elif args.part == "resident":
        part_resident(args)
    report(args)


if __name__ == "__main__":
    main()
