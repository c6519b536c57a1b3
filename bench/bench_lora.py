"""LoRA against full fine-tuning on the Quickstart model: what trains, and what a step costs.

    nice -n 10 python bench/bench_lora.py [--steps 10] [--rank 8]

The Quickstart's GPT-NeoX (configs/genslm/quickstart.yaml: hidden 256, 4 blocks, 256-codon
windows, batch 16; its precision decided as run.py decides it on this CPU) takes one AdamW step
with clipping through the resident CPU backend, full and with model.lora (its default targets:
every block's four projections), the two alternating step by step after two warm-up steps each;
the median wall and CPU seconds per step are reported. Beside them: parameters that train,
optimizer state, and from the CSX compile-time plan the MemoryX bytes and the gradient bytes
streamed out per step. Writes bench/results/lora.md.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import ROOT, codon_batch, machine, markdown_table, our_train_step, timed, write_result

QUICKSTART = ROOT / "configs" / "genslm" / "quickstart.yaml"


def variants(rank: int):
    from modelzoo.backends.precision import decide
    from modelzoo.config import LoraConfig, load_params
    params = load_params(QUICKSTART, check_paths=False)
    cfg, _ = decide(params.model, "cpu")
    return params, {"full fine-tuning": cfg,
                    f"LoRA rank {rank}": cfg.model_copy(update={"lora": LoraConfig(rank=rank, alpha=2.0 * rank)})}


def csx_plan(cfg, params):
    from modelzoo.backends.csx.plan import make_plan
    from modelzoo.models import build_model
    with torch.device("meta"):
        model = build_model(cfg)
    data = params.train_input
    return make_plan(model, (data.batch_size, data.max_seq_length), 1, 1, 1, params.optimizer, keep_activations=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each variant")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    params, configs = variants(args.rank)
    data = params.train_input
    batch = {k: v for k, v in codon_batch(next(iter(configs.values())), data.batch_size, data.max_seq_length).items()
             if k != "hf_labels"}
    steps, counts = {}, {}
    for name, cfg in configs.items():
        from modelzoo.models import build_model
        from modelzoo.models.lora import trainable_count
        steps[name], _ = our_train_step(cfg, batch)
        counts[name] = trainable_count(build_model(cfg))
        for _ in range(2):  # warm-up: kernel choice, optimizer state
            steps[name]()
    walls, cpus = {n: [] for n in configs}, {n: [] for n in configs}
    for _ in range(args.steps):
        for name, step in steps.items():
            wall, cpu = timed(step)
            walls[name].append(wall)
            cpus[name].append(cpu)
    full = next(iter(configs))
    rows = [("", "parameters that train", "optimizer state (AdamW)", "step wall s (median)", "step CPU s (median)",
             "CSX MemoryX", "CSX gradients out per step")]
    for name, cfg in configs.items():
        trained, total = counts[name]
        plan = csx_plan(cfg, params)
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        ratio = "" if name == full else f" ({wall / statistics.median(walls[full]):.2f}x)"
        rows.append((name, f"{trained:,} of {total:,} ({100 * trained / total:.1f}%)",
                     f"{2 * 4 * trained / 2 ** 20:.2f} MiB", f"{wall:.3f}{ratio}", f"{cpu:.3f}",
                     f"{plan.memoryx_bytes / 2 ** 20:.1f} MiB", f"{plan.streamed_out / 2 ** 20:.2f} MiB"))
    precision = str(next(iter(configs.values())).compute_dtype).removeprefix("torch.")
    text = (f"{machine()}; compute dtype {precision}; batch {data.batch_size} x {data.max_seq_length} codons; "
            f"{args.steps} timed steps of each, alternating.\n\n" + markdown_table(rows) + "\n\n"
            "LoRA still runs the whole forward pass, and the backward pass through every block for the "
            "activations' gradients (the adapters sit inside the blocks); it skips the frozen weights' gradient "
            "matmuls (a third of a dense layer's training FLOPs) and their optimizer update. What training "
            "keeps and moves shrinks with the trained parameters: optimizer state and, on CSX, MemoryX "
            "(frozen weights are held once, with no gradient or state) and the gradients streamed out per step.")
    path = write_result("lora.md", "LoRA vs full fine-tuning: the Quickstart model",
                        f"nice -n 10 python bench/bench_lora.py --steps {args.steps} --rank {args.rank}", text)
    print(path.read_text())


if __name__ == "__main__":
    main()
