"""Dense vs sparse training side by side: eval loss after the same steps, and CSX weight bytes.

    python bench/bench_sparsity.py [--steps 150] [--hidden 128 --layers 4 --heads 4 --ffn 512]
                                   [--seq 256] [--batch 8] [--variants dense,static,rigl]

A GPT-J on the shipped SARS-CoV-2 genomes (data/sars_cov_2/, split by genome as
configs/genslm/quickstart.yaml) trains once per variant through ``run.py CPU`` (train_and_eval,
same seed, data order and schedule): dense, and density 0.3 static, RigL (dynamic) and, on
request, SET and GMP. The CSX backend runs the same sparse steps to the same losses
(tests/training/test_sparsity.py holds them equal), so training happens once, on the resident
backend; the CSX columns are the compile-time plan's weight bytes streamed per step, and the bytes
one CSX step really streamed. The plan of the shipped GenSLM-25M preset (configs/genslm/gptj_25M_msl2048.yaml,
bf16) at the same densities is printed too. Writes bench/results/sparsity.md.

The defaults are smaller than GenSLM-25M (hidden 512, 8 layers, MSL 2048): on 2 shared CPU cores
one GenSLM-25M step takes ~100 s (bench/results/csx_vs_cpu.md), too slow for three runs of
hundreds of steps. Pass --hidden 512 --layers 8 --heads 8 --ffn 2048 for the real shape.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GENOMES = ROOT / "data" / "sars_cov_2" / "nextstrain_2020_example_sequences.fasta.gz"
DENSITY = 0.3
NOTE = ("Train time is wall time (training and evaluation) on a shared, loaded 2-core machine: on the "
        "resident backends masked weights still compute dense, so sparsity saves no time there; the saving "
        "is the CSX weight bytes streamed. CSX measured = bytes one CSX training step really streamed.")


def sparsity_section(variant: str, steps: int) -> dict | None:
    every = max(steps // 10, 1)
    return {"dense": None,
            "static": {"density": DENSITY, "init_method": "random"},
            "rigl": {"algorithm": "rigl", "density": DENSITY, "update_frequency": every,
                     "end_step": int(0.75 * steps), "drop_fraction": 0.3},
            "set": {"algorithm": "set", "density": DENSITY, "update_frequency": every,
                    "end_step": int(0.75 * steps), "drop_fraction": 0.3},
            "gmp": {"algorithm": "gmp", "density": DENSITY, "update_frequency": every,
                    "start_step": steps // 10, "end_step": int(0.75 * steps)}}[variant]


def raw_params(args, data: Path, model_dir: Path, variant: str) -> dict:
    split = {"input": [str(GENOMES)], "split": [0.9, 0.05, 0.05], "seed": 0}
    warmup = max(args.steps // 10, 1)
    raw = {"train_input": {"data_dir": str(data / "train"), "batch_size": args.batch, "max_seq_length": args.seq,
                           "prepare": split},
           "eval_input": {"data_dir": str(data / "val"), "batch_size": args.batch, "max_seq_length": args.seq,
                          "shuffle": False, "prepare": split},
           "model": {"name": "gptj", "hidden_size": args.hidden, "num_hidden_layers": args.layers,
                     "num_heads": args.heads, "filter_size": args.ffn, "max_position_embeddings": args.seq,
                     "rotary_dim": args.hidden // args.heads // 4, "dropout_rate": 0.0},
           "optimizer": {"optimizer_type": "AdamW", "weight_decay": 0.01, "max_gradient_norm": 1.0,
                         "learning_rate": [{"scheduler": "Linear", "initial_learning_rate": 0.0,
                                            "end_learning_rate": args.lr, "total_iters": warmup},
                                           {"scheduler": "CosineDecay", "initial_learning_rate": args.lr,
                                            "end_learning_rate": args.lr / 10,
                                            "total_iters": args.steps - warmup}]},
           "runconfig": {"mode": "train_and_eval", "model_dir": str(model_dir), "max_steps": args.steps,
                         "log_steps": max(args.steps // 10, 1), "checkpoint_steps": 0, "max_checkpoints": 1,
                         "eval_steps": args.eval_batches, "seed": 1}}
    section = sparsity_section(variant, args.steps)
    if section is not None:
        raw["sparsity"] = section
    return raw


def train(args, data: Path, work: Path, variant: str) -> dict:
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from modelzoo.cli import main as run

    model_dir = work / variant
    path = work / f"{variant}.yaml"
    path.write_text(yaml.safe_dump(raw_params(args, data, model_dir, variant), sort_keys=False))
    start = time.perf_counter()
    assert run(["CPU", "--params", str(path)]) == 0, f"{variant} run failed"
    seconds = time.perf_counter() - start
    events = EventAccumulator(str(model_dir / "eval")).Reload()
    result = {"variant": variant, "eval_loss": events.Scalars("loss")[-1].value,
              "eval_accuracy": events.Scalars("accuracy")[-1].value, "seconds": seconds}
    train_events = EventAccumulator(str(model_dir / "train")).Reload()
    tags = train_events.Tags()["scalars"]
    if "sparsity/default/density" in tags:
        result["density"] = train_events.Scalars("sparsity/default/density")[-1].value
        moved = [e.value for e in train_events.Scalars("sparsity/default/moved")] \
            if "sparsity/default/moved" in tags else []
        result["moved"] = int(sum(moved))
    return result


def csx_bytes(raw: dict) -> tuple[int, int, int | None]:
    """(dense, sparse) weight bytes streamed per step per system from the plan, and the sparse
    bytes one CSX training step really streamed (None without sparsity)."""
    import torch

    from modelzoo.backends.csx import CSXBackend
    from modelzoo.backends.csx.plan import make_plan
    from modelzoo.backends.csx.sparse_stream import streamed_bytes
    from modelzoo.config import validate_params
    from modelzoo.data.datasets import build_dataloader
    from modelzoo.models import build_model
    from modelzoo.training.sparsity import build_sparsifier

    params = validate_params(raw, check_paths=False)
    backend = CSXBackend(params)
    with torch.device("meta"):
        model = build_model(params.model)
    plan = make_plan(model, backend.micro_batch, backend.micro_batches, 1, 1, params.optimizer)
    if params.sparsity is None:
        return plan.streamed_in, plan.streamed_in, None
    figures = streamed_bytes(plan, model, build_sparsifier(params.sparsity, model.named_parameters()), True)
    if "train_input" not in raw:
        return figures.dense_step, figures.sparse_step, None
    torch.manual_seed(params.runconfig.seed)
    backend.setup(build_model(params.model), params.optimizer, params.sparsity)
    cfg = params.train_input
    batch = next(iter(build_dataloader(cfg.data_dir, cfg.batch_size, shuffle=False, shuffle_seed=0,
                                       max_seq_length=cfg.max_seq_length)))
    backend.train_step([batch], 1e-4)
    measured = backend.sparse_stream.bytes_in
    backend.close()
    return figures.dense_step, figures.sparse_step, measured


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.2f}"


def genslm_25m_rows() -> list[str]:
    import yaml
    raw = yaml.safe_load((ROOT / "configs" / "genslm" / "gptj_25M_msl2048.yaml").read_text())
    raw.pop("train_input"), raw.pop("eval_input")
    raw["runconfig"]["mode"] = "train"
    dense, _, _ = csx_bytes(raw)
    rows = [f"| GenSLM-25M dense | {mib(dense)} | 1.000 |"]
    for variant in ("static", "rigl"):
        raw["sparsity"] = sparsity_section(variant, 2000)
        _, sparse, _ = csx_bytes(raw)
        rows.append(f"| GenSLM-25M density {DENSITY} ({variant}) | {mib(sparse)} | {sparse / dense:.3f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval_batches", type=int, default=40, help="validation batches per evaluation (the same ones "
                                                                 "for every run)")
    p.add_argument("--variants", default="dense,static,rigl", help="comma list of dense, static, rigl, set, gmp")
    p.add_argument("--work_dir", help="where shards and model dirs go (default: a temporary directory)")
    args = p.parse_args()
    os.chdir(ROOT)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_sparsity_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"shards_msl{args.seq}"
    variants = args.variants.split(",")
    results = []
    for variant in variants:
        results.append(train(args, data, work, variant))
        print(results[-1], flush=True)
    dense = next((r for r in results if r["variant"] == "dense"), None)
    header = ("| run | eval loss | eval accuracy | realised density | weights moved | "
              "CSX weights in / step (MiB, plan) | CSX measured (MiB) | sparse / dense bytes | train time (s) |\n"
              "|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        d, s, measured = csx_bytes(raw_params(args, data, work / r["variant"], r["variant"]))
        loss_ratio = f" ({r['eval_loss'] / dense['eval_loss']:.3f}x)" if dense and r is not dense else ""
        rows.append(f"| {r['variant']} | {r['eval_loss']:.4f}{loss_ratio} | {r['eval_accuracy']:.4f} | "
                    f"{r.get('density', 1.0):.4f} | {r.get('moved', 0)} | {mib(s)} | {mib(measured)} | "
                    f"{s / d:.3f} | {r['seconds']:.0f} |")
    table = "\n".join([header] + rows) + "\n\n" + NOTE
    n_params = args.hidden * args.hidden * 4 * args.layers + 2 * args.hidden * args.ffn * args.layers
    setup = (f"GPT-J hidden {args.hidden}, {args.layers} layers, {args.heads} heads, FFN {args.ffn} "
             f"(~{n_params / 1e6:.1f}M weights in blocks), MSL {args.seq}, batch {args.batch}, {args.steps} steps, "
             f"fp32, AdamW lr {args.lr:g} warm-up + cosine, seed 1, eval loss on the first {args.eval_batches} "
             f"validation batches; trained on the resident CPU backend; "
             f"density {DENSITY} on every weight matrix but the embedding. {platform.machine()}, "
             f"{os.cpu_count()} CPUs (shared).")
    genslm = "\n".join(["| GenSLM-25M (configs/genslm/gptj_25M_msl2048.yaml, bf16, batch 2) | CSX weights in / step "
                        "(MiB, plan) | sparse / dense |", "|---|---|---|"] + genslm_25m_rows())
    print(setup)
    print(table)
    print(genslm)
    out = ROOT / "bench" / "results" / "sparsity.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Dense vs sparse training\n\n`python bench/bench_sparsity.py "
                   f"{' '.join(sys.argv[1:])}`\n\n{setup}\n\n{table}\n\n{genslm}\n")


if __name__ == "__main__":
    main()
