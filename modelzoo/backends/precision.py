"""Precision: every 'auto' of the model config decided once, before the model is built.

A run computes in the config ``decide`` returns: model.mixed_precision settled for the device
(model.mixed_precision_on_cpu) and model.attention_in_fp32 a boolean. Everything that reads the
config afterwards (``autocast``, the weights CSX streams, FSDP's policy, loss scaling, the memory
plan, attention, the log) follows that one decision; nothing is written back into a module.
"""

from __future__ import annotations

import contextlib

import torch

from modelzoo.config import ModelConfig
from modelzoo.models import layers  # the CPU's matmul probe (tests replace it there)


def decide(cfg: ModelConfig, device_type: str) -> tuple[ModelConfig, str | None]:
    """The model config a run computes with on ``device_type`` ('cpu' or 'cuda'), every 'auto'
    a boolean, and the line the run logs about it (``precision_on``'s)."""
    computed, note = precision_on(cfg, device_type)
    return computed.model_copy(update={"attention_in_fp32": attention_setting(computed, device_type)}), note


def precision_on(cfg: ModelConfig, device_type: str) -> tuple[ModelConfig, str | None]:
    """The model config's mixed precision on ``device_type`` ('cpu' or 'cuda'), and the line the
    run logs about it.

    With model.mixed_precision on a CPU, model.mixed_precision_on_cpu decides: 'auto' computes in
    fp16_type where this CPU multiplies matrices faster in it than in fp32
    (``layers.cpu_matmul_speedup``, one figure agreed by all ranks), else in fp32; true and false
    force either. GPUs keep the config as it is.
    """
    setting, low = cfg.mixed_precision_on_cpu, cfg.fp16_type
    if not cfg.mixed_precision or device_type != "cpu" or setting is True:
        return cfg, None
    fp32 = cfg.model_copy(update={"mixed_precision": False})
    if setting is False:
        return fp32, f"model.mixed_precision: computing in float32, not {low}, on this CPU: " \
                     f"model.mixed_precision_on_cpu is false"
    speedup = agreed_cpu_matmul_speedup(cfg.compute_dtype)
    measured = f"its {low} matmuls measured {speedup:.2f}x the float32 rate"
    if speedup > 1.0:
        return cfg, f"model.mixed_precision: computing in {low} on this CPU: {measured} " \
                    f"(model.mixed_precision_on_cpu: false computes in float32)"
    return fp32, f"model.mixed_precision: computing in float32, not {low}, on this CPU: {measured} " \
                 f"(model.mixed_precision_on_cpu: true computes in {low} anyway)"


def attention_setting(cfg: ModelConfig, device_type: str) -> bool:
    """model.attention_in_fp32 as a boolean for a config whose mixed precision is decided: 'auto'
    is fp32 attention where this CPU multiplies matrices no faster in the compute dtype than in
    fp32 (the figure all ranks agreed on), as ``layers.attention_in_fp32`` decides it for a model
    built by hand."""
    setting = cfg.attention_in_fp32
    if setting != "auto":
        return setting
    if not cfg.mixed_precision or device_type != "cpu":
        return False
    return agreed_cpu_matmul_speedup(cfg.compute_dtype) <= 1.0


def agreed_cpu_matmul_speedup(dtype: torch.dtype) -> float:
    """``layers.cpu_matmul_speedup`` averaged over the ranks of a distributed run, so that all
    ranks decide alike."""
    from modelzoo.backends import base  # read at call time: tests stand in for the process group there
    speedup = layers.cpu_matmul_speedup(dtype)
    _, world = base.rank_and_world()
    if world > 1:
        total = torch.tensor([speedup], dtype=torch.float64)
        base.dist.all_reduce(total)
        speedup = float(total) / world
    return speedup


def autocast(device_type: str, cfg: ModelConfig):
    """Low-precision autocast when ``cfg`` says mixed precision (a config ``decide`` has settled
    for the device), else nothing."""
    if not cfg.mixed_precision:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=cfg.compute_dtype)


def as_run(cfg: ModelConfig) -> str:
    """The decided fields, as comment lines for the params written to model_dir (the params
    themselves stay as given, so the same file resumes the same run on another machine)."""
    return (f"# as run on this device: model.mixed_precision: {str(cfg.mixed_precision).lower()}, "
            f"model.attention_in_fp32: {str(cfg.attention_in_fp32).lower()}\n")
