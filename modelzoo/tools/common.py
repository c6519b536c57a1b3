"""What the command-line tools share about the model they read: its flags, the checks on them,
the GenomeLM they load, and the paths their outputs may not touch (``python -m modelzoo.tools.*``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from modelzoo.errors import ConfigError
from modelzoo.inference import DEFAULT_BATCH_WINDOWS, GenomeLM, Layer
from modelzoo.training import checkpoint as ckpt

MAX_BATCH = 1 << 20  # windows per forward pass: far past any memory, short of overflowing anything
MAX_BATCH_TOKENS = 1 << 32  # tokens per forward pass, likewise


def add_model_arguments(parser, overwrite: str | None = None, packed: bool = False) -> None:
    """The model flags; ``overwrite``: the help of an --overwrite flag, for a tool with an output;
    ``packed``: a tool reading records through GenomeLM's streams (packed batches of
    --batch_tokens, --batch_size a cap, --num_workers_per_node)."""
    parser.add_argument("--model_dir", help="model_dir of a training run (its newest good checkpoint is used)")
    parser.add_argument("--checkpoint_path", help="use this checkpoint file instead of the newest in model_dir")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    if packed:
        parser.add_argument("--batch_tokens", type=int, default=None,
                            help=f"tokens per batch, padding included (default: {DEFAULT_BATCH_WINDOWS} "
                                 f"windows of the model's context); short records share a window")
        parser.add_argument("--batch_size", type=int, default=None,
                            help="at most this many windows per batch (default: --batch_tokens decides)")
        parser.add_argument("--num_workers_per_node", type=int, default=1,
                            help="processes on this machine (each its own GPU with --device cuda), each "
                                 "computing a share of the batches; the output is the same bytes")
    else:
        parser.add_argument("--batch_size", type=int, default=8, help="windows (or sequences) per forward pass")
    if overwrite:
        parser.add_argument("--overwrite", action="store_true", help=overwrite)


def parse_layer(text: str) -> Layer:
    """A --layer flag: an integer index, or "final"."""
    if text == "final":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: an integer layer index or 'final'") from None


def model_inputs(args) -> list[Path]:
    """What a tool reads of the model, which its output may be none of and hold none of: the
    --model_dir and --checkpoint_path named, and every checkpoint (with its seal) of the
    directory each is or is in, as given and with symbolic links resolved."""
    inputs = []
    for source in (args.checkpoint_path, args.model_dir):
        if not source or "\0" in str(source):
            continue
        given = Path(source)
        inputs.append(given)
        try:
            resolved = given.resolve()
        except (OSError, RuntimeError):  # a symlink loop: nothing to protect beyond the name
            continue
        inputs.append(resolved)
        for _, path in ckpt.list_checkpoints(resolved if resolved.is_dir() else resolved.parent):
            inputs += [path, path.with_name(path.name + ".sha256")]
    return inputs


def model_from_args(args) -> GenomeLM:
    if not (args.checkpoint_path or args.model_dir):
        raise ConfigError("--model_dir (or --checkpoint_path) is required")
    if args.batch_size is not None and not 1 <= args.batch_size <= MAX_BATCH:  # None: no cap
        raise ConfigError(f"--batch_size {args.batch_size}: must be 1 to {MAX_BATCH:,}")
    tokens = getattr(args, "batch_tokens", None)
    if tokens is not None and not 1 <= tokens <= MAX_BATCH_TOKENS:
        raise ConfigError(f"--batch_tokens {tokens}: must be 1 to {MAX_BATCH_TOKENS:,}")
    return GenomeLM.load(args.checkpoint_path or args.model_dir, device=_device(args.device))


def _device(name: str) -> torch.device:
    """The --device, once torch knows it and this machine has it (one line otherwise)."""
    try:
        device = torch.device(name)
        if device.type == "meta":
            raise ValueError("meta tensors hold no values")
        torch.empty(0, device=device)  # raises where the device type or index is not here
    except (RuntimeError, AssertionError, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        if "Expected one of" in why:  # torch lists every device type it knows
            why = "unknown device type; e.g. cpu, cuda, cuda:1, mps"
        raise ConfigError(f"--device {name!r}: not usable here ({why})") from None
    return device
