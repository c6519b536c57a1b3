"""Checkpoints: ``model_dir/checkpoint_{step}.mdl`` plus a ``.sha256`` seal, written atomically.

A checkpoint counts only when its seal exists and matches: a crash mid-write leaves at worst a
``*.tmp`` file (ignored) or an unsealed file (skipped with a message), never a half-read state,
and the previous checkpoints are untouched because nothing is ever overwritten in place.

A checkpoint holds tensors and plain data only (dicts, lists, tuples, numbers, strings, None), and
loading accepts nothing else (``torch.load(weights_only=True)``): loading a checkpoint never runs
code, whoever wrote it. The seal detects corruption and truncation; it does not say who wrote it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import mmap
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from modelzoo.errors import CheckpointError
from modelzoo.files import atomic_file, fsync_dir
from modelzoo.torch_zip import check_expansion

log = logging.getLogger("modelzoo")
_NAME = re.compile(r"^checkpoint_(\d+)\.mdl$")


def training_state(state: dict, step: int, params, **extra) -> dict:
    """``state`` (a backend's state_dict, or a model's tensors as {"model": ...}) completed in place
    into what a checkpoint holds: the step, the scheduler's position, every random stream, the
    model's name and the params; ``extra`` after them (e.g. nonfinite_skipped). The one place a
    checkpoint's fields are put together: training and convert_checkpoint's imports both use it."""
    state.update(step=step, scheduler={"step": step}, rng=rng_state(), model_name=params.model.name,
                 params=params.to_yaml(), **extra)
    return state


def rng_state() -> dict:
    """Every random stream a resumed run continues, as tensors and plain data only: a checkpoint
    holds nothing else (checkpoint.load_checkpoint refuses anything else)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"bit_generator": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": random.getstate()}  # (version, tuple of ints, None or float)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):  # else numpy's own tuple, as checkpoints of earlier versions hold it
        numpy = (numpy["bit_generator"], numpy["key"].numpy().astype(np.uint32), numpy["pos"],
                 numpy["has_gauss"], numpy["gauss"])
    np.random.set_state(numpy)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(model_dir: str | Path, step: int) -> Path:
    return Path(model_dir) / f"checkpoint_{step}.mdl"


def _seal_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _atomic_file(path: Path):
    """modelzoo.files.atomic_file writing ``path.tmp``: a crash leaves ``checkpoint_*.tmp``,
    which pruning tidies."""
    return atomic_file(path, tmp=path.with_name(path.name + ".tmp"))


def save_checkpoint(model_dir: str | Path, step: int, state: dict) -> Path:
    """Write to a temporary name, fsync, rename; then the seal.

    On failure (disk full, read-only directory) nothing of this checkpoint is left behind and
    the earlier ones are untouched.
    """
    path = checkpoint_path(model_dir, step)
    if hasattr(state, "write_to"):  # a state larger than RAM (CSX disk MemoryX) streams itself out
        write = state.write_to
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)

        def write(file) -> None:
            file.write(buffer.getbuffer())

    digest = hashlib.sha256()
    try:
        with _atomic_file(path) as f:
            write(_HashingWriter(f, digest))
    except BaseException as e:
        cause = e if isinstance(e, OSError) else e.__context__  # torch's writer wraps the OSError
        if isinstance(cause, OSError):
            raise _write_error(path, cause) from None
        raise
    try:
        with _atomic_file(_seal_path(path)) as f:
            f.write(digest.hexdigest().encode())
        fsync_dir(path.parent)  # the renames durable: a power cut must not lose the seal later
    except OSError as e:
        _remove_quietly(path)  # data without its seal is unusable: do not leave it to be skipped later
        raise _write_error(path, e) from None
    return path


class _HashingWriter:
    def __init__(self, file, digest):
        self.file, self.digest = file, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _write_error(path: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"{path}: cannot write checkpoint ({e.strerror or e}); earlier checkpoints are untouched")


def _remove_quietly(path: Path) -> None:
    for p in (path, _seal_path(path)):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def list_checkpoints(model_dir: str | Path) -> list[tuple[int, Path]]:
    """Sealed-or-not checkpoint files in model_dir, oldest first."""
    found = []
    if Path(model_dir).is_dir():
        for p in Path(model_dir).iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found)


def verify(path: Path) -> str | None:
    """None when the checkpoint's seal matches its bytes, else what is wrong."""
    seal = _seal_path(path)
    if not seal.exists():
        return f"no {seal.name} next to it (an interrupted write, or copied without its seal)"
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        expected = seal.read_text().strip()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if digest != expected:
        return "sha256 checksum mismatch (truncated or corrupted)"
    return None


def _load_mapped(path: Path) -> dict:
    """torch.load through a memory map: pages come in as tensors are read, so a state larger
    than RAM loads too. The map is private (copy-on-write) unless the file is as large as RAM:
    the kernel charges a private map against RAM + swap and refuses one that large (heuristic
    overcommit), a shared one not. Such a checkpoint only fits a consumer that copies each
    tensor out (CSX MemoryX, inference) and never writes to them, which could reach the file.
    Deciding up front matters: torch leaks the file descriptor of a refused map, which keeps a
    deleted checkpoint's disk space until the process ends.

    Only tensors and plain data are unpickled (weights_only), plus the few numpy types that
    earlier versions stored numpy's RNG state with (``_numpy_rng_state``)."""
    shared = path.stat().st_size >= _ram_bytes()
    with torch.serialization.safe_globals(_numpy_rng_state()):
        if not shared:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "Cannot allocate memory" not in str(e):
                    raise
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _numpy_rng_state() -> list:
    """What checkpoints of earlier versions need beyond tensors and plain data: numpy's RNG state
    as an ndarray of uint32 words. These rebuild an array of that dtype from its bytes and call
    nothing else (an object array needs the object dtype, which stays refused)."""
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct as reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct as reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (reconstruct, "numpy.core.multiarray._reconstruct"),  # pickled by numpy 1
            (reconstruct, "numpy._core.multiarray._reconstruct")]  # and by numpy 2


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): torch maps privately there
        return 1 << 62


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    check_expansion(path)  # a sealed zip bomb still must not make torch allocate what the file lacks
    try:
        state = _load_mapped(path)
    except pickle.UnpicklingError as e:  # what weights_only refuses: it could run code, if nothing else
        raise CheckpointError(f"{path}: holds objects other than tensors and plain data ({_refused(e)}); "
                              f"not loaded, since loading them could run code") from None
    except Exception as e:  # sealed yet unreadable: written by something else, or another torch
        why = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path}: not a Model Zoo checkpoint (no model state and step)")
    problem = field_problem(state)
    if problem:
        raise CheckpointError(f"{path}: field {problem}")
    return state


# ---------------------------------------------------------------------- the fields' types
# A sealed checkpoint may still hold anything plain (it was written by something else, or edited
# and sealed again): every field a loader reads is checked here, once, for every loader (run.py
# resume and --checkpoint_path, eval_all, GenomeLM.load, convert), so a wrong type is one line
# naming the file and the field rather than a traceback wherever it is first used.

# the per-parameter state each optimizer keeps (torch.optim), by optim.optimizer_state_by_name's
# type (a test compares it with what torch keeps for every optimizer_type of the params)
OPTIMIZER_STATE = {"Adam": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
                   "AdamW": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
                   "SGD": {"momentum_buffer"}}


def _shown(value) -> str:
    text = repr(value) if not torch.is_tensor(value) else f"tensor of shape {tuple(value.shape)}"
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def _count(value) -> bool:
    return type(value) is int and value >= 0


def _number(value) -> bool:
    return type(value) in (int, float) or (torch.is_tensor(value) and value.ndim == 0 and value.is_floating_point())


def field_problem(state: dict) -> str | None:
    """What is wrong with the types of a loaded checkpoint's fields ("name: why"), or None."""
    if not _count(state["step"]):
        return f"step: {_shown(state['step'])} is not a step count (a whole number >= 0)"
    model = state["model"]
    if not isinstance(model, dict):
        return f"model: {_shown(model)} is not a mapping of tensor names to tensors"
    for name, value in model.items():
        if not isinstance(name, str) or not torch.is_tensor(value):
            return f"model[{name!r}]: {_shown(value)} is not a tensor"
    for key, check, what in (("params", lambda v: isinstance(v, str), "text (the params yaml)"),
                             ("model_name", lambda v: isinstance(v, str), "text"),
                             ("nonfinite_skipped", _count, "a count"),
                             ("scheduler", lambda v: isinstance(v, dict) and _count(v.get("step")), "{step: count}"),
                             ("dataloader", lambda v: isinstance(v, dict) and _count(v.get("epoch"))
                              and _count(v.get("batches_done")), "{epoch: count, batches_done: count}"),
                             ("loss_scale", lambda v: isinstance(v, dict) and _number(v.get("scale"))
                              and _count(v.get("good_steps")) and _count(v.get("skipped_steps", 0)),
                              "{scale: number, good_steps: count, skipped_steps: count}")):
        if key in state and not check(state[key]):
            return f"{key}: {_shown(state[key])} is not {what}"
    for key, check in (("rng", _rng_problem), ("optimizer", _optimizer_problem), ("sparsity", _sparsity_problem)):
        if key in state:
            problem = check(state[key], model) if key != "rng" else check(state[key])
            if problem:
                return f"{key}{problem}"
    return None


def _rng_problem(rng) -> str | None:
    """Each random stream's state, tried on a throwaway generator of its kind (the process's own
    streams are untouched): a wrong size or type fails there as it would on resume."""
    import random

    import numpy as np
    if not isinstance(rng, dict):
        return f": {_shown(rng)} is not a mapping of random streams"
    tries = {"torch": lambda v: torch.Generator().set_state(v), "python": lambda v: random.Random().setstate(v),
             "numpy": lambda v: np.random.RandomState().set_state(_numpy_state(v))}
    for key, apply in tries.items():
        if key not in rng:
            return f".{key}: missing"
        try:
            apply(rng[key])
        except (TypeError, ValueError, RuntimeError, KeyError, IndexError, AttributeError, OverflowError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:120]
            return f".{key}: {_shown(rng[key])} is not a {key} random state ({why})"
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, (list, tuple)) or not all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in cuda):
        return f".cuda: {_shown(cuda)} is not a list of CUDA random states"
    return None


def _numpy_state(saved):
    """numpy's legacy state tuple from a checkpoint's dict (trainer.rng_state), or as saved."""
    import numpy as np
    if isinstance(saved, dict):
        key = saved["key"].numpy().astype(np.uint32)
        return saved["bit_generator"], key, saved["pos"], saved["has_gauss"], saved["gauss"]
    return saved


def _optimizer_problem(saved, model: dict) -> str | None:
    """optim.optimizer_state_by_name's format: a type, and per parameter of the model its state."""
    if not (isinstance(saved, dict) and isinstance(saved.get("type"), str) and isinstance(saved.get("state"), dict)):
        return f": {_shown(saved)} is not {{type: name, state: {{parameter: {{name: value}}}}}}"
    known = OPTIMIZER_STATE.get(saved["type"])  # None: a type this table does not know; the backend says
    for name, values in saved["state"].items():
        where = f".state[{name!r}]"
        if not isinstance(name, str) or name not in model:
            return f"{where}: the checkpoint's model has no tensor of that name"
        if not isinstance(values, dict):
            return f"{where}: {_shown(values)} is not a mapping of state names to values"
        for key, value in values.items():
            if known is not None and key not in known:
                return f"{where}[{key!r}]: not a state {saved['type']} keeps ({', '.join(sorted(known))})"
            if torch.is_tensor(value) and value.ndim and tuple(value.shape) != tuple(model[name].shape):
                return (f"{where}[{key!r}]: shape {tuple(value.shape)}, but the model's tensor has "
                        f"{tuple(model[name].shape)}")
            if not (torch.is_tensor(value) or _number(value)):
                return f"{where}[{key!r}]: {_shown(value)} is not a tensor or number"
    return None


def _sparsity_problem(saved, model: dict) -> str | None:
    masks = saved.get("masks", {}) if isinstance(saved, dict) else None
    if not isinstance(masks, dict):
        return f": {_shown(saved)} is not {{algorithm, step, masks}}"
    for name, mask in masks.items():
        if not isinstance(name, str) or name not in model or not torch.is_tensor(mask):
            return f".masks[{name!r}]: {_shown(mask)} is not a mask of a tensor of the model"
    if "step" in saved and not _count(saved["step"]):
        return f".step: {_shown(saved['step'])} is not a step count"
    return None


def _refused(e: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, in a few words."""
    why = str(e).split("WeightsUnpickler error:", 1)[-1]
    name = re.search(r"GLOBAL (\S+)|got <class '([^']+)'>", why)
    if name:
        return name.group(1) or name.group(2)
    lines = [line.strip() for line in why.splitlines() if line.strip()]
    return lines[0][:160] if lines else type(e).__name__


def newest_good_checkpoint(model_dir: str | Path) -> Path | None:
    """The newest checkpoint whose seal matches; bad ones are reported and skipped."""
    for step, path in reversed(list_checkpoints(model_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping %s: %s", path, problem)
    return None


def prune_checkpoints(model_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; also drop ``*.tmp`` files that a crash left behind."""
    for _, path in list_checkpoints(model_dir)[:-keep]:
        _remove_quietly(path)
    for orphan in Path(model_dir).glob("checkpoint_*.tmp"):
        orphan.unlink(missing_ok=True)


def check_model_state(path_or_name, saved: dict, expected: dict[str, torch.Size]) -> None:
    """Refuse a checkpoint of another architecture, naming the first mismatching tensors."""
    missing = [k for k in expected if k not in saved]
    if missing:
        raise CheckpointError(f"{path_or_name}: checkpoint has no tensor {missing[0]!r} "
                              f"({len(missing)} missing): it belongs to another model")
    for name, shape in expected.items():
        if tuple(saved[name].shape) != tuple(shape):
            raise CheckpointError(f"{path_or_name}: tensor {name!r} has shape {tuple(saved[name].shape)} in the "
                                  f"checkpoint but {tuple(shape)} in this model")
    extra = [k for k in saved if k not in expected]
    if extra:
        raise CheckpointError(f"{path_or_name}: checkpoint has tensor {extra[0]!r} that this model lacks")
