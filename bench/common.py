"""Helpers shared by the side-by-side benchmarks: matmul peak, model FLOPs, train-step timing,
subprocess workers with their own peak RSS, and markdown result tables.

The machines are shared and loaded, so every benchmark measures both sides in one run,
alternating, and reports ratios; absolute figures are only context.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# GenSLM-25M (GenSLM's neox_25,290,752.json): the model every training benchmark uses.
GENSLM_25M = dict(vocab_size=69, hidden_size=512, num_hidden_layers=8, num_heads=8, filter_size=2048,
                  dropout_rate=0.1, attention_dropout_rate=0.0, layer_norm_epsilon=1e-5)
OPTIMIZER = dict(optimizer_type="AdamW", learning_rate=1e-4, weight_decay=0.01, max_gradient_norm=1.0)


def machine() -> str:
    """What a result was measured on: results from different CPUs do not compare (their bf16 and
    fp32 matmul rates differ by up to 4x)."""
    return f"{platform.machine()}, {cpu_name()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU model unknown"


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_flops_per_s(dtype: torch.dtype, shape=(2048, 2048, 2048), repeats: int = 3) -> tuple[float, float]:
    """Best-of-``repeats`` FLOP/s of one (m x k) @ (k x n) matmul in ``dtype``: per wall second
    and per CPU second (see ``timed``)."""
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # first call: kernel selection, buffers
    walls, cpus = zip(*(timed(lambda: a @ b) for _ in range(repeats)))
    return 2 * m * k * n / min(walls), 2 * m * k * n / min(cpus)


def matmul_peak(dtype: torch.dtype, hidden: int = 512, tokens: int = 4096) -> tuple[float, float]:
    """The best of a square matmul and the model's own projection shapes, per wall second and
    per CPU second: the peaks we measure utilisation against."""
    shapes = [(2048, 2048, 2048), (tokens, hidden, 4 * hidden), (tokens, 4 * hidden, hidden)]
    rates = [matmul_flops_per_s(dtype, s) for s in shapes]
    return max(r[0] for r in rates), max(r[1] for r in rates)


def train_flops(cfg, batch: int, seq: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), without recomputation.

    Weight matmuls: 6 x (matmul parameters) per token. Attention scores and weighted values:
    4 x seq^2 x hidden per sequence and layer in the forward, halved for causal models (the
    kernels skip the masked half, so that is the work there is to do).
    """
    d, f, layers, vocab = cfg.hidden_size, cfg.ffn_size, cfg.num_hidden_layers, cfg.vocab_size
    matmul_params = layers * (4 * d * d + 2 * d * f) + d * vocab + (d * d if cfg.name == "bert" else 0)
    attention = 4 * seq * seq * d * layers * (1.0 if cfg.name == "bert" else 0.5)
    return 3 * batch * (2 * matmul_params * seq + attention)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call.

    On a machine shared with other jobs the wall time mostly measures the queue for the cores;
    the process's CPU time measures the work (worker processes run with OMP_WAIT_POLICY=PASSIVE
    so idle OpenMP threads sleep instead of spinning into it).
    """
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_worker(script: Path, args: list[str], timeout: float | None = None) -> dict:
    """Run ``script --worker ...`` in its own process (so its peak RSS is its own); the worker
    prints one JSON object as its last stdout line."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[tuple]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in body]
    return "\n".join(lines)


def write_result(name: str, title: str, command: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(f"# {title}\n\n`{command}`\n\n{text}\n")
    return path


# ---------------------------------------------------------------- ours and transformers' train steps

def our_config(name: str, seq: int, bf16: bool, **overrides):
    from modelzoo.config import ModelConfig
    fields = dict(GENSLM_25M, name=name, max_position_embeddings=seq, mixed_precision=bf16, **overrides)
    if name == "gptj":
        fields.setdefault("rotary_dim", 16)  # GenSLM's rotary_pct 0.25 of head_dim 64
    return ModelConfig(**fields)


def codon_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random codons. Causal models: labels are the next codon (pre-shifted, as our datasets
    give them) and ``hf_labels`` the unshifted ids transformers shifts itself. BERT: 15% of the
    positions become [MASK] and only they are labelled, for both."""
    from modelzoo.data.tokenizer import CodonTokenizer
    tok = CodonTokenizer()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if cfg.name == "bert":
        chosen = torch.rand(batch, seq, generator=g) < 0.15
        labels = torch.where(chosen, ids, -100)
        inputs = torch.where(chosen, tok.mask_id, ids)
        return {"input_ids": inputs, "attention_mask": mask, "labels": labels, "hf_labels": labels}
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "hf_labels": ids}


def our_train_step(cfg, batch: dict) -> tuple[Callable[[], float], int]:
    """One full optimizer step of our model through the resident CPU backend (autocast when
    cfg.mixed_precision, AdamW, gradient clipping) and its parameter count."""
    from modelzoo.backends.resident import ResidentBackend
    from modelzoo.config import OptimizerConfig
    from modelzoo.models import build_model
    torch.manual_seed(0)
    model = build_model(cfg)
    backend = ResidentBackend("cpu")
    backend.setup(model, OptimizerConfig(**OPTIMIZER))
    mb = {k: v for k, v in batch.items() if k != "hf_labels"}
    return (lambda: backend.train_step([mb], 1e-4)["loss"]), sum(p.numel() for p in model.parameters())


def hf_train_step(model, batch: dict, bf16: bool) -> tuple[Callable[[], float], int]:
    """The same step for a transformers model: autocast forward with labels, backward, the same
    gradient clipping and the same AdamW (our optimizer builder on its parameters)."""
    from modelzoo.config import OptimizerConfig
    from modelzoo.training import optim
    model.train()
    optimizer = optim.build_optimizer(model.named_parameters(), OptimizerConfig(**OPTIMIZER))
    params = list(model.parameters())

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["hf_labels"]).loss
        loss.backward()
        optim.clip_gradients(params, OPTIMIZER["max_gradient_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step, sum(p.numel() for p in params)


def hf_twin(kind: str, cfg):
    """A transformers model of the same size as ``cfg``: GPTJForCausalLM, GPT2LMHeadModel and
    BertForMaskedLM with our weights (via modelzoo.models.hf); GPTNeoXForCausalLM (GenSLM's own
    architecture: parallel attention/MLP, rotary on 25% of each head) with its own random
    initialisation. Attention is transformers' default for the class on CPU ('sdpa' where the
    class supports it; GPT-J supports only 'eager' there) unless ``kind`` names one after a
    slash, e.g. 'GPT2LMHeadModel/eager' (transformers' classic quadratic-memory attention)."""
    import transformers
    from modelzoo.models import build_model, hf
    kind, _, implementation = kind.partition("/")
    if kind == "GPTNeoXForCausalLM":
        config = transformers.GPTNeoXConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_size, rotary_pct=0.25,
            max_position_embeddings=cfg.max_position_embeddings, hidden_dropout=cfg.dropout_rate,
            attention_dropout=cfg.attention_dropout_rate, layer_norm_eps=cfg.layer_norm_epsilon,
            use_parallel_residual=True, bos_token_id=None, eos_token_id=None, pad_token_id=3)
        if implementation:
            config._attn_implementation = implementation
        torch.manual_seed(0)
        return transformers.GPTNeoXForCausalLM(config)
    torch.manual_seed(0)
    ours = build_model(cfg)
    config = hf.hf_config(cfg)
    if implementation:
        config._attn_implementation = implementation
    twin = getattr(transformers, kind)(config)
    missing, unexpected = twin.load_state_dict(hf.to_hf_state(cfg, ours.state_dict()), strict=False)
    if [k for k in missing if not k.endswith(hf.IGNORED_SUFFIXES)] or unexpected:
        raise RuntimeError(f"{kind}: weights did not map: missing {missing}, unexpected {unexpected}")
    return twin


def attention_kind(model) -> str:
    return model.config._attn_implementation


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class _AttentionDtypes(torch.overrides.TorchFunctionMode):
    """Records the dtype attention scores are computed in: the output of every
    scaled_dot_product_attention call, and of every matmul whose result is a 4-D (seq x seq)
    score matrix (eager attention). Output dtypes, because autocast may recast the inputs."""

    def __init__(self, seq: int):
        super().__init__()
        self.seq, self.dtypes = seq, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        scores = (func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
                  and isinstance(out, torch.Tensor) and out.dim() == 4 and tuple(out.shape[-2:]) == (self.seq,) * 2)
        if func is torch.nn.functional.scaled_dot_product_attention or scores:
            self.dtypes.add(_DTYPE_NAMES.get(out.dtype, str(out.dtype)))
        return out


def attention_precision(step: Callable[[], object], seq: int) -> str:
    """Run ``step`` once and say which precision its attention computed in (e.g. 'bf16')."""
    with _AttentionDtypes(seq) as mode:
        step()
    return "+".join(sorted(mode.dtypes)) or "none seen"
