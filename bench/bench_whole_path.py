"""The whole path a user runs: ``run.py CPU`` on a GenSLM preset vs a bare transformers loop.

    python bench/bench_whole_path.py [--steps 3] [--rounds 3] [--only bf16:gpt_neox_preset ...]

Ours: ``modelzoo.cli.main(["CPU", "--params", ...])`` in a process of its own, on the GenSLM-25M
presets at MSL 2048, batch 2 (configs/genslm/gptj_25M_msl2048.yaml and neox_25M_msl2048.yaml),
changed only in mode (train), model_dir, max_steps and precision: the trainer, the dataloader
over the preset's real SARS-CoV-2 shards (prepared once, before any side runs), logging every 10
steps, TensorBoard scalars, the checkpoint cadence (every 200 steps, and one at the end).
Theirs: a bare loop over the same windows (a shuffled torch DataLoader), transformers'
GPTNeoXForCausalLM (GenSLM's architecture; 'sdpa' attention, no attention_mask so its causal
flash kernel runs as ours does: [PAD] only ever follows a record), the same shape and settings
(hidden dropout 0.1, rotary on a quarter of each head, tanh GELU as F.gelu, untied head),
torch.optim.AdamW (lr 1e-3, weight decay 0.01) under transformers' warm-up + cosine-to-min-lr
schedule (the presets' shape), clip_grad_norm_ 1.0, loss.item() every step and a print every 10.

Rows, each in fp32 and bf16 autocast: our GPT-J and our GPT-NeoX. In bf16 ours runs the preset
as it ships (``mixed_precision: true``, ``mixed_precision_on_cpu: auto``: bf16 where this CPU's
bf16 matmuls are faster than fp32, else fp32; what a user of the preset gets here), and, where
auto picks fp32, also forced (``mixed_precision_on_cpu: true``: bf16 autocast like theirs). A
third table sets our bf16 runs against our fp32 ones: the measurement behind that decision.

Every side runs in a process of its own, all sides one after another in each of --rounds
rounds, so they share the machine's load. Per side: each step's wall and CPU time from the end
of one optimizer step to the end of the next (everything the loop does: data, step, logging,
metrics), the first step left out as the warm-up; the best step over the rounds is kept (load
only ever slows a step down). Ratios are of tokens per CPU second (the work; the machine is
shared), wall-clock alongside. The profile splits ours into the backend's train_step (forward +
backward, and of it the optimizer step: norms, clipping, AdamW) and the trainer's own work
around it: the next batch, and the rest (learning rate, micro-batch split, counters, progress
bar, log lines and TensorBoard scalars at log steps); the final checkpoint's time is spread over
the preset's 200-step cadence. Writes bench/results/whole_path.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (see common.run_worker)

from common import ROOT, machine, markdown_table, run_worker, write_result  # noqa: E402

PRESETS = {"gptj": "configs/genslm/gptj_25M_msl2048.yaml", "gpt_neox": "configs/genslm/neox_25M_msl2048.yaml"}
# side -> (our preset's model, model.mixed_precision_on_cpu) per precision; "hf" is the bare loop.
# The forced bf16 sides run only where the presets' auto computes in fp32 (else they are the presets).
SIDES = {"fp32": {"gptj": ("gptj", None), "gpt_neox": ("gpt_neox", None), "hf": None},
         "bf16": {"gptj_preset": ("gptj", "auto"), "gpt_neox_preset": ("gpt_neox", "auto"),
                  "gptj": ("gptj", True), "gpt_neox": ("gpt_neox", True), "hf": None}}
TARGET = 1.25  # the issue: run.py / the bare transformers loop, tokens/s
CHECKPOINT_STEPS = 200  # the presets' cadence
NO_FORCED = "; so the presets compute in bf16 here, and bf16 forced would be the same runs"


def preset(model: str) -> dict:
    import yaml
    return yaml.safe_load((ROOT / PRESETS[model]).read_text())


def tokens_per_step(raw: dict) -> int:
    return raw["train_input"]["batch_size"] * raw["train_input"]["max_seq_length"]


class Clock:
    """Wall and CPU seconds of named spans, and the times optimizer steps ended."""

    def __init__(self):
        self.spans: dict[str, list[tuple[float, float]]] = {}
        self.ends: list[tuple[float, float]] = []

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def add(self, name: str, start: tuple[float, float]) -> None:
        wall, cpu = self.now()
        self.spans.setdefault(name, []).append((wall - start[0], cpu - start[1]))

    def wrap(self, owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = self.now()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(name, start)
        setattr(owner, attribute, timed)

    def step_ended(self) -> None:
        self.ends.append(self.now())

    def result(self, main_start: tuple[float, float]) -> dict:
        """Each step after the warm-up: (wall, CPU) from the end of the step before to its own end,
        and its spans (``step_spans[name][i]``: step i + 1's); the whole process's time."""
        wall, cpu = self.now()
        steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.ends, self.ends[1:])]
        per_step = {name: spans[1:len(self.ends)] for name, spans in self.spans.items()
                    if name in ("train_step", "optimizer", "data")}
        return {"steps": steps, "step_spans": per_step, "spans": self.spans,
                "whole": (wall - main_start[0], cpu - main_start[1])}


# ---------------------------------------------------------------- ours: run.py's path

def ours_worker(side: str, precision: str, steps: int) -> dict:
    import yaml
    from modelzoo.backends.resident import ResidentBackend
    from modelzoo.cli import main as run
    from modelzoo.data.datasets import GenomeDataLoader
    from modelzoo.training.step import OptimizerStep
    from modelzoo.trainer import Trainer
    model, on_cpu = SIDES[precision][side]
    clock = Clock()
    train_step = ResidentBackend.train_step

    def counted(self, micro_batches, lr):
        start = clock.now()
        out = train_step(self, micro_batches, lr)
        clock.add("train_step", start)
        clock.step_ended()
        return out
    ResidentBackend.train_step = counted
    clock.wrap(OptimizerStep, "__call__", "optimizer")
    clock.wrap(Trainer, "save", "checkpoint")
    batches = GenomeDataLoader.__iter__

    def timed_batches(self):
        it = batches(self)
        while True:
            start = clock.now()
            batch = next(it)
            clock.add("data", start)
            yield batch
    GenomeDataLoader.__iter__ = timed_batches
    raw = preset(model)
    with tempfile.TemporaryDirectory() as tmp:
        raw["runconfig"].update(mode="train", model_dir=f"{tmp}/model", max_steps=steps)
        raw["model"]["mixed_precision"] = precision == "bf16"
        if on_cpu is not None:
            raw["model"]["mixed_precision_on_cpu"] = on_cpu
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        start = clock.now()
        if run(["CPU", "--params", str(path)]) != 0:
            raise SystemExit(f"run.py CPU failed for {side} {precision}")
        out = clock.result(start)
        out["log"] = (Path(tmp) / "model" / "run.log").read_text()
    return out


# ---------------------------------------------------------------- theirs: a bare transformers loop

def hf_worker(precision: str, steps: int) -> dict:
    import numpy as np
    import torch
    import transformers
    from modelzoo.config import validate_params
    from modelzoo.data.shards import ShardSet
    from modelzoo.models import hf
    raw = preset("gpt_neox")
    params = validate_params(raw, check_paths=False)
    cfg, opt = params.model, raw["optimizer"]
    warmup, decay = opt["learning_rate"]
    clock = Clock()
    start = clock.now()
    config = hf.hf_config(cfg)  # GenSLM's GPTNeoXConfig for these settings
    config.hidden_act = "gelu_pytorch_tanh"  # the same tanh GELU as GenSLM's gelu_fast, through F.gelu (faster)
    torch.manual_seed(params.runconfig.seed)
    model = transformers.GPTNeoXForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=warmup["end_learning_rate"], weight_decay=opt["weight_decay"])
    schedule = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup["total_iters"], warmup["total_iters"] + decay["total_iters"],
        min_lr=decay["end_learning_rate"])
    shards = ShardSet(params.train_input.data_dir)
    ids = torch.from_numpy(np.stack([shards[i] for i in range(len(shards))]).astype(np.int64))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=params.train_input.batch_size,
                                         shuffle=True, drop_last=True)
    pad, bf16 = shards.pad_id, precision == "bf16"
    step, batches = 0, iter(loader)
    while step < steps:
        data = clock.now()
        try:
            (input_ids,) = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        clock.add("data", data)
        labels = input_ids.masked_fill(input_ids == pad, -100)
        forward = clock.now()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        update = clock.now()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt["max_gradient_norm"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        clock.add("optimizer", update)
        clock.add("train_step", forward)
        clock.step_ended()
        step += 1
        value = loss.item()
        if step % params.runconfig.log_steps == 0 or step == steps:
            print(f"step {step} loss {value:.4f} lr {schedule.get_last_lr()[0]:.3g}", file=sys.stderr)
    return clock.result(start)


# ---------------------------------------------------------------- the run

def run_sides(jobs: list[tuple[str, str]], steps: int, rounds: int) -> dict:
    runs: dict[tuple[str, str], list[dict]] = {job: [] for job in jobs}
    for r in range(rounds):
        for precision, side in jobs:  # one after another, round after round: every side sees the same load
            args = ["--worker", f"{precision}:{side}", "--steps", str(steps)]
            out = run_worker(Path(__file__), args, timeout=3600)
            best = min(out["steps"], key=lambda s: s[1])
            print(f"round {r + 1} {precision} {side}: best step {best[0]:.2f} s wall, {best[1]:.2f} s CPU; "
                  f"whole process {out['whole'][0]:.1f} s", flush=True)
            runs[(precision, side)].append(out)
    return runs


def best_step(outs: list[dict]) -> tuple[float, float]:
    steps = [s for out in outs for s in out["steps"]]
    return min(s[0] for s in steps), min(s[1] for s in steps)


def computed_in(outs: list[dict], precision: str) -> str:
    """What our run computed in, from its log's precision line (absent: as configured)."""
    log = outs[0]["log"]
    return "bf16" if "computing in bfloat16" in log else "fp32" if "computing in float32" in log else precision


LABELS = {"gptj": "GPT-J", "gpt_neox": "GPT-NeoX", "gptj_preset": "GPT-J, preset as shipped",
          "gpt_neox_preset": "GPT-NeoX, preset as shipped"}


def throughput_table(runs: dict, tokens: int) -> str:
    rows = [("ours (run.py CPU)", "computes in: ours / theirs", "ours tokens/s: CPU (wall)",
             "transformers loop tokens/s: CPU (wall)", "run.py / transformers: CPU (wall)", "per round (CPU)",
             f"target >= {TARGET}x")]
    for precision, sides in SIDES.items():
        if (precision, "hf") not in runs:
            continue
        theirs_runs = runs[(precision, "hf")]
        theirs = best_step(theirs_runs)
        for side, (_, on_cpu) in ((k, v) for k, v in sides.items() if k != "hf" and (precision, k) in runs):
            ours_runs = runs[(precision, side)]
            ours = best_step(ours_runs)
            forced = " (mixed_precision_on_cpu: true)" if on_cpu is True else ""
            cpu, wall = theirs[1] / ours[1], theirs[0] / ours[0]
            rounds = ", ".join(f"{best_step([t])[1] / best_step([o])[1]:.2f}" for o, t in zip(ours_runs, theirs_runs))
            rows.append((LABELS[side], f"{computed_in(ours_runs, precision)}{forced} / {precision}",
                         f"{tokens / ours[1]:.0f} ({tokens / ours[0]:.0f})",
                         f"{tokens / theirs[1]:.0f} ({tokens / theirs[0]:.0f})", f"**{cpu:.2f}x** ({wall:.2f}x)",
                         rounds, "met" if cpu >= TARGET else "missed"))
    return markdown_table(rows)


def precision_table(runs: dict, tokens: int) -> str:
    """Our own runs in bf16 (the preset as shipped, and forced) against fp32, per model."""
    rows = [("ours (run.py CPU)", "fp32 tokens/s: CPU (wall)", "bf16 run", "its tokens/s: CPU (wall)",
             "bf16 run / fp32: CPU (wall)")]
    for model in PRESETS:
        if ("fp32", model) not in runs:
            continue
        fp32 = best_step(runs[("fp32", model)])
        for side in (f"{model}_preset", model):
            if ("bf16", side) not in runs:
                continue
            outs = runs[("bf16", side)]
            other = best_step(outs)
            what = ("preset as shipped (auto)" if side.endswith("_preset") else "mixed_precision_on_cpu: true")
            rows.append((LABELS[model], f"{tokens / fp32[1]:.0f} ({tokens / fp32[0]:.0f})",
                         f"{what}: computes in {computed_in(outs, 'bf16')}",
                         f"{tokens / other[1]:.0f} ({tokens / other[0]:.0f})",
                         f"{fp32[1] / other[1]:.2f}x ({fp32[0] / other[0]:.2f}x)"))
    return markdown_table(rows)


def profile_table(runs: dict) -> str:
    """Per side, medians over every step after the warm-up (all rounds) of the loop iteration and
    of its parts, each step's parts from that step; CPU ms with wall ms in brackets."""
    rows = [("side", "step (one loop iteration)", "train_step: forward + backward + optimizer step",
             "of it the optimizer step (norms, clipping, AdamW)", "next batch", "the trainer's other work",
             "checkpoint, spread over 200 steps", "outside forward/backward/optimizer: per step, share")]
    for (precision, side), outs in runs.items():
        parts: dict[str, list[tuple[float, float]]] = {"step": [], "train_step": [], "optimizer": [], "data": [],
                                                       "other": []}
        for out in outs:
            spans = out["step_spans"]
            for i, step in enumerate(out["steps"]):
                model, data = spans["train_step"][i], spans["data"][i]
                parts["step"].append(step)
                parts["train_step"].append(model)
                parts["optimizer"].append(spans["optimizer"][i])
                parts["data"].append(data)
                parts["other"].append(tuple(step[k] - model[k] - data[k] for k in (0, 1)))
        med = {name: tuple(statistics.median(v[k] for v in values) for k in (0, 1)) for name, values in parts.items()}
        saves = [out["spans"]["checkpoint"][-1] for out in outs if "checkpoint" in out["spans"]]
        checkpoint = tuple(statistics.median(c[k] for c in saves) / CHECKPOINT_STEPS for k in (0, 1)) if saves else None
        outside = tuple(med["data"][k] + med["other"][k] + (checkpoint[k] if checkpoint else 0.0) for k in (0, 1))

        def ms(pair):
            return "-" if pair is None else f"{pair[1] * 1e3:.1f} ({pair[0] * 1e3:.1f})"
        name = "transformers loop" if side == "hf" else f"run.py {side}"
        rows.append((f"{name}, {precision}", ms(med["step"]), ms(med["train_step"]), ms(med["optimizer"]),
                     ms(med["data"]), ms(med["other"]), ms(checkpoint),
                     f"{ms(outside)}: {outside[1] / med['step'][1]:.2%}"))
    return markdown_table(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is the warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="runs of every side, one after another")
    p.add_argument("--only", action="append", help="precision:side, e.g. bf16:gpt_neox_preset (plus its bf16:hf)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        precision, side = args.worker.split(":")
        out = hf_worker(precision, args.steps) if side == "hf" else ours_worker(side, precision, args.steps)
        print(json.dumps(out))
        return
    from modelzoo.config import validate_params
    from data_preparation.first_use import ensure_prepared
    os.chdir(ROOT)
    for model in PRESETS:  # the shards every side reads, prepared before any side is timed
        ensure_prepared(validate_params(preset(model), check_paths=False))
    import torch
    from modelzoo.models.layers import cpu_matmul_speedup
    speedup = cpu_matmul_speedup(torch.bfloat16)  # what the presets' mixed_precision_on_cpu: auto goes by
    forced = speedup <= 1.0  # auto computes in fp32 here: measure bf16 forced as well
    jobs = [(precision, side) for precision, sides in SIDES.items() for side, spec in sides.items()
            if forced or spec is None or spec[1] is not True]
    if args.only:
        wanted = {tuple(o.split(":")) for o in args.only}
        jobs = [job for job in jobs if job in wanted or (job[1] == "hf" and any(w[0] == job[0] for w in wanted))]
    runs = run_sides(jobs, args.steps, args.rounds)
    tokens = tokens_per_step(preset("gpt_neox"))
    header = (f"GenSLM-25M, MSL 2048, batch 2, {args.rounds} rounds of {args.steps} optimizer steps per side (the "
              f"first of each run is the warm-up; best step kept), every side in its own process; {machine()}: "
              f"its bf16 matmuls measured {speedup:.2f}x the fp32 rate (layers.cpu_matmul_speedup, "
              f"what mixed_precision_on_cpu: auto goes by{'' if forced else NO_FORCED}). "
              f"Tokens/s are per CPU second of a whole loop iteration (wall-clock in brackets): the machine is "
              f"shared, so CPU time is the steadier measure of the work.")
    text = (f"{header}\n\n## run.py vs a bare transformers loop\n\n{throughput_table(runs, tokens)}\n\n"
            f"## The CPU precision decision: our bf16 runs against fp32\n\n{precision_table(runs, tokens)}\n\n"
            f"## Where a step's time goes (medians per step after the warm-up)\n\n{profile_table(runs)}")
    print(text)
    defaults = {"steps": 3, "rounds": 3}
    command = "python bench/bench_whole_path.py" + "".join(
        f" --{k} {getattr(args, k)}" for k, v in defaults.items() if getattr(args, k) != v)
    command += "".join(f" --only {o}" for o in args.only or [])
    path = write_result("whole_path.md", "The whole path: run.py CPU vs a bare transformers loop", command, text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
