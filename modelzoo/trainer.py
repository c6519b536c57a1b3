"""The training loop: steps, accumulation, logging, evaluation and checkpoint cadence.

It knows nothing of how a step executes (that is the backend's) nor of the model's math. It sits
above the backends, beside the command line; training/ (the optimizer step, optimizers and
schedules, loss scaling, sparsity, checkpoints, metrics) sits below them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from modelzoo import startup
from modelzoo.backends.base import Backend, rank_and_world
from modelzoo.backends.precision import as_run
from modelzoo.config import CHECKPOINT_STATES, DataInput, Params
from modelzoo.distributed import launched_world_size, release_process_group
from modelzoo.data.datasets import CausalLMDataset, build_dataloader, dataset_for, nonpad_tokens
from modelzoo.errors import CheckpointError, ConfigError, TrainingError
from modelzoo.interrupts import raise_if_interrupted
from modelzoo.models import transfer_backbone
from modelzoo.training import checkpoint as ckpt
from modelzoo.training.metrics import ScalarWriters, attach_run_log, close_logging, setup_logging
from modelzoo.training.optim import learning_rate_at

log = logging.getLogger("modelzoo")
# How the resident backends' memory plan (backends/memory_plan.py) ends when it does not fit.
RESIDENT_PLAN_DOES_NOT_FIT = "does not fit with these params"
BASELINE_CODONS = 1 << 23  # train codons the count-model baselines are fitted on, at most


def split_micro_batches(batch: dict, n: int) -> list[dict]:
    size = next(iter(batch.values())).shape[0]
    if size % n:
        raise ConfigError(f"optimizer.grad_accum_steps ({n}) must divide the per-system batch size ({size})")
    return [{k: v[i * size // n:(i + 1) * size // n] for k, v in batch.items()} for i in range(n)]


class Trainer:
    def __init__(self, params: Params, backend: Backend, model_dir: Path, dataset_cls=None):
        self.params = params
        self.backend = backend
        self.model_dir = model_dir
        self.rank, self.world = rank_and_world()
        self.is_writer = self.rank == 0
        self.writers = ScalarWriters(model_dir if self.is_writer else None)
        self.dataset_cls = dataset_cls
        self.step = 0
        self.train_loader = None
        self.eval_loader = None
        self.nonfinite_skipped = 0  # batches skipped for a non-finite loss or gradient, over the run
        # what from_params settled: the model it built, its precision line, the ranks a plan is for
        self.model = None
        self.precision_note: str | None = None
        self.ranks = 1

    # ------------------------------------------------------------ start-up

    @classmethod
    def from_params(cls, params: Params, device: str, source: str = "params", only_plan: str | None = None,
                    validated: bool = False) -> "Trainer":
        """The run of ``params`` on ``device`` ('CPU', 'GPU', 'CSX'), in start-up order: validate
        (unless the caller just did: ``validated``), join the process group, make the backend,
        decide precision and build the model; ``run()`` then loads and runs. ``only_plan``
        ('validate' or 'compile'): nothing will run, so no process group, no device needed, and
        the model is shapes only (``describe_plan``). Use it as a context manager: the backend
        and the process group are released however the run ends."""
        if validated:
            ranks = startup.ranks_requested(device, params)
        else:
            ranks = startup.validate(params, device, source, only_plan)
        if not only_plan:
            startup.join(device)
        backend = startup.make_backend(device, params, bool(only_plan))
        try:
            model, note = startup.build(params, device, backend, bool(only_plan))
            trainer = cls(params, backend, Path(params.runconfig.model_dir))
        except BaseException:
            backend.close(failed=True)
            raise
        trainer.model, trainer.precision_note = model, note
        trainer.ranks = max(ranks, launched_world_size())
        return trainer

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        failed = exc_type is not None
        try:
            self.backend.close(failed=failed)
        finally:
            if not failed:  # on an error nothing may wait on the other ranks
                release_process_group()
            close_logging()  # run.log closed: a caller (a notebook, a test) may start another run

    def describe_plan(self, compile_only: bool) -> str:
        """--validate_only (the shards opened and checked too) or --compile_only (the execution
        plan; a resident plan that does not fit is shown, then refused in one line)."""
        params = self.params
        if not compile_only:
            self._check_data()
        n = sum(p.numel() for p in self.model.parameters())
        lines = [f"params OK: {params.model.name}, {n:,} parameters ({n * 4 / 2**20:.1f} MiB fp32), "
                 f"backend {self.backend.describe()}", *params.notes]
        if self.precision_note:
            lines.append(self.precision_note)
        plan = self.backend.plan(self.model, params, self.ranks) if compile_only else None
        if plan:
            lines.append(plan)
        verdict = plan.splitlines()[-1] if plan else ""
        if verdict.startswith(RESIDENT_PLAN_DOES_NOT_FIT):
            # as CSX refuses a stage its wafer cannot hold: the plan is shown, the run refused in one line
            print("\n".join(lines))
            raise ConfigError(f"--compile_only: {verdict}")
        return "\n".join(lines)

    def _check_data(self) -> None:
        """The shards the run would read (manifests, shapes, tokenizer and max_seq_length against
        the params; not every shard's checksum). Sections still to be prepared on first use have
        nothing to check yet."""
        sections = [self.params.train_input, self.params.eval_input]
        if any(s is not None and s.prepare is not None and not Path(s.data_dir).is_dir() for s in sections):
            return
        self.open_datasets(self.params.runconfig.mode, verify=False)

    def run(self) -> int:
        """Read everything the run needs before writing anything: bad shards or a bad checkpoint
        end the run with model_dir untouched (not even created). An existing model_dir's run.log
        does record which checkpoint was skipped or resumed from. Logging is set up once; run.log
        joins it when model_dir exists, with what was logged before."""
        params, model_dir, mode = self.params, self.model_dir, self.params.runconfig.mode
        resuming = model_dir.is_dir()
        with model_dir_errors(model_dir):
            setup_logging(model_dir if resuming else None, self.rank)
        for note in params.notes:  # what reading the params decided (a Model Zoo file's ignored keys, ...)
            log.info(note)
        if self.precision_note:
            log.info(self.precision_note)
        self.open_datasets(mode)
        training = mode in ("train", "train_and_eval")
        self.backend.setup(self.model, params.optimizer if training else None, params.sparsity if training else None)
        self.load_starting_checkpoint(mode)
        with model_dir_errors(model_dir):
            if self.is_writer:
                model_dir.mkdir(parents=True, exist_ok=True)
                # the params as given, and what their precision 'auto's were decided as on this device
                (model_dir / f"params_{mode}.yaml").write_text(params.to_yaml() + as_run(self.model.config))
            if not resuming:
                attach_run_log(model_dir, self.rank)
        try:
            if mode == "train":
                self.train()
            elif mode == "train_and_eval":
                self.train(evaluate_every=params.runconfig.eval_frequency)
                self.evaluate()
            elif mode == "eval":
                self.evaluate()  # of the checkpoint load_starting_checkpoint loaded
            else:
                self.eval_all()
        finally:
            self.close()
        return 0

    # ------------------------------------------------------------ data

    def _loader(self, cfg: DataInput, shuffle: bool, verify: bool = True, whole: bool = False):
        # The objective follows the model: causal LM, masked LM (BERT) or labelled windows (classifier).
        dataset_cls, dataset_kwargs = dataset_for(self.params.model, cfg, self.params.runconfig.seed)
        if self.dataset_cls:
            dataset_cls, dataset_kwargs = self.dataset_cls, {}
        return build_dataloader(cfg.data_dir, cfg.batch_size, shuffle=shuffle, shuffle_seed=cfg.shuffle_seed,
                                num_workers=cfg.num_workers, rank=self.rank, world_size=self.world,
                                max_seq_length=cfg.max_seq_length, dataset_cls=dataset_cls,
                                dataset_kwargs=dataset_kwargs, verify=verify, pad_last=whole,
                                reading_frame=cfg.reading_frame)

    def open_datasets(self, mode: str, verify: bool = True) -> None:
        """Open the shard directories the mode reads, checking their manifests against the params
        (and, with ``verify``, every shard's checksum). Writes nothing, so bad data fails the run
        before model_dir is created or touched."""
        if mode in ("train", "train_and_eval"):
            self.train_loader = self._loader(self.params.train_input, self.params.train_input.shuffle, verify)
        if mode != "train":
            self.eval_loader = self._loader(self.params.eval_input, False, verify, whole=True)

    # ------------------------------------------------------------ checkpoints

    def load_starting_checkpoint(self, mode: str) -> None:
        """Load the checkpoint the mode starts from (a bad one is a one-line error); writes nothing."""
        run = self.params.runconfig
        if mode in ("train", "train_and_eval"):
            self.restore()
        elif mode == "eval":
            path = run.checkpoint_path or ckpt.newest_good_checkpoint(self.model_dir)
            self.load_for_eval(Path(path) if path else None)
        elif not self._good_checkpoints():
            self.load_for_eval(None)  # eval_all with nothing to evaluate: the same clear error

    def restore(self) -> None:
        """Resume from the newest good checkpoint in model_dir, or start from --checkpoint_path.

        Once the run has good checkpoints of its own they win over a --checkpoint_path from
        elsewhere, so re-running the same command resumes instead of starting over; a
        --checkpoint_path inside model_dir is an explicit roll-back and is honoured.
        """
        run = self.params.runconfig
        own = ckpt.newest_good_checkpoint(self.model_dir)
        start = Path(run.checkpoint_path) if run.checkpoint_path else None
        if start is not None and (own is None or start.resolve().parent == self.model_dir.resolve()):
            path, states = start, run.checkpoint_states
        elif own is not None:
            path, states = own, set(CHECKPOINT_STATES)
        else:
            return
        # fine-tuning may swap the task head (BERT MLM -> classifier)
        state = self._load_into_backend(path, states, transfer_head=states == {"model"})
        if "scheduler" in states:
            self.step = int(state["step"])
            self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        if "dataloader" in states and self.train_loader is not None and "dataloader" in state:
            self.train_loader.load_state_dict(state["dataloader"])
        if "rng" in states:
            ckpt.set_rng_state(state["rng"])
        log.info("loaded %s (states: %s) at step %d", path, ",".join(sorted(states)), self.step)

    def _load_into_backend(self, path: Path, states: set[str], transfer_head: bool = False) -> dict:
        state = ckpt.load_checkpoint(path)
        try:
            if transfer_head:
                state["model"] = transfer_backbone(state["model"], self.backend.state_dict()["model"], str(path))
            self.backend.load_state_dict(state, states)
        except CheckpointError as e:  # e.g. another architecture: name the file, not just the tensor
            message = str(e).removeprefix("checkpoint: ")
            raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None
        return state

    def save(self) -> None:
        state = self.backend.state_dict()  # every rank joins: CSX may gather sharded MemoryX
        if not self.is_writer:
            return
        ckpt.training_state(state, self.step, self.params, nonfinite_skipped=self.nonfinite_skipped)
        if self.train_loader is not None:
            state["dataloader"] = self.train_loader.state_dict()
        path = ckpt.save_checkpoint(self.model_dir, self.step, state)
        ckpt.prune_checkpoints(self.model_dir, self.params.runconfig.max_checkpoints)
        log.info("saved %s", path)

    # ------------------------------------------------------------ training

    def _last_step(self) -> int:
        run = self.params.runconfig
        if run.num_steps is None and run.max_steps is None:
            raise ConfigError("runconfig.max_steps: required for training (or pass --num_steps / --max_steps)")
        end = self.step + run.num_steps if run.num_steps else run.max_steps
        return min(end, run.max_steps) if run.max_steps else end

    def train(self, evaluate_every: int = 0) -> None:
        cfg, run, opt = self.params.train_input, self.params.runconfig, self.params.optimizer
        if self.train_loader is None:  # not opened up front by run()
            self.open_datasets("train")
            self.restore()
        last = self._last_step()
        if self.step >= last:
            log.info("nothing to train: already at step %d (target %d)", self.step, last)
            return
        log.info("training %s from step %d to %d on %s", self.params.model.name, self.step, last,
                 self.backend.describe())
        batches = iter(self.train_loader)
        window_start, window_steps, window_tokens, window_nonpad = time.perf_counter(), 0, 0, 0
        bar = tqdm(total=last, initial=self.step, desc="train", unit="step", disable=not self.is_writer,
                   dynamic_ncols=True)
        with bar, logging_redirect_tqdm([log]):  # the bar ends its line even when a step fails
            while self.step < last:
                raise_if_interrupted()  # a SIGTERM whose exception a finalizer swallowed
                batch = next(batches)
                lr = learning_rate_at(self.step, opt)
                metrics = self.backend.train_step(split_micro_batches(batch, opt.grad_accum_steps), lr)
                if self._skip_nonfinite(metrics):
                    continue
                self.step += 1
                window_steps += 1
                window_tokens += batch["input_ids"].numel() * self.world  # positions computed
                window_nonpad += nonpad_tokens(batch)  # of them real tokens (this rank's)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                self._write_extra_scalars(metrics)
                if self.step % run.log_steps == 0 or self.step == last:
                    elapsed = time.perf_counter() - window_start
                    nonpad = torch.tensor(float(window_nonpad), dtype=torch.float64)
                    if self.world > 1:  # every rank logs at the same steps
                        torch.distributed.all_reduce(nonpad)
                    scalars = {"loss": metrics["loss"], "lr": lr, "grad_norm": metrics["grad_norm"],
                               "samples_per_sec": window_steps * cfg.batch_size / elapsed,
                               "tokens_per_sec": window_tokens / elapsed,
                               "nonpad_tokens_per_sec": float(nonpad) / elapsed}
                    log.info("step %d | loss %.4f | lr %.3g | grad_norm %.3f | %.2f samples/s | %.0f tokens/s | "
                             "%.0f non-pad tokens/s", self.step, scalars["loss"], lr, scalars["grad_norm"],
                             scalars["samples_per_sec"], scalars["tokens_per_sec"], scalars["nonpad_tokens_per_sec"])
                    self.writers.write("train", self.step, scalars)
                    window_start, window_steps, window_tokens, window_nonpad = time.perf_counter(), 0, 0, 0
                if run.checkpoint_steps and self.step % run.checkpoint_steps == 0 and self.step != last:
                    self.save()
                if evaluate_every and self.step % evaluate_every == 0 and self.step != last:
                    self.evaluate()
        self.save()

    def _write_extra_scalars(self, metrics: dict) -> None:
        """Scalars a backend returns beyond loss, grad_norm and overflow (e.g. sparsity's realised
        density and weights moved) go to TensorBoard under train/ at the step they are returned:
        the backend decides their cadence."""
        extra = {k: v for k, v in metrics.items() if k not in ("loss", "grad_norm", "overflow")
                 and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if extra:
            self.writers.write("train", self.step, extra)

    def _skip_nonfinite(self, metrics: dict) -> bool:
        """False for a finite step. For a non-finite loss or gradient (which the backend did not
        apply): True when runconfig.nonfinite_policy skips the batch, else TrainingError."""
        bad = [f"{key} is {metrics[key]}" for key in ("loss", "grad_norm") if not math.isfinite(metrics[key])]
        if metrics.get("overflow") and bad == [f"grad_norm is {metrics['grad_norm']}"]:
            bad = []  # an fp16 loss-scale overflow: the backend skipped it and lowered the scale
        if not bad:
            return False
        run = self.params.runconfig
        what = f"step {self.step + 1}: {' and '.join(bad)}"
        if run.nonfinite_policy == "skip" and self.nonfinite_skipped < run.max_nonfinite_skips:
            self.nonfinite_skipped += 1
            log.warning("%s; batch skipped (%d of at most %d)", what, self.nonfinite_skipped,
                        run.max_nonfinite_skips)
            self.writers.write("train", self.step + 1, {"nonfinite_skipped": self.nonfinite_skipped})
            return True
        limit = (f" after {self.nonfinite_skipped} skipped batches (runconfig.max_nonfinite_skips)"
                 if run.nonfinite_policy == "skip" else "")
        saved = ckpt.list_checkpoints(self.model_dir)
        kept = f"the newest checkpoint, {saved[-1][1]}, is untouched" if saved else "no checkpoint was written yet"
        raise TrainingError(f"{what}; stopping{limit} ({kept})")

    # ------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        cfg = self.params.eval_input
        loader = self.eval_loader or self._loader(cfg, shuffle=False, whole=True)
        loader.load_state_dict({"epoch": 0, "batches_done": 0})  # every evaluation sees the same batches
        n = min(self.params.runconfig.eval_steps or loader.num_batches_per_epoch, loader.num_batches_per_epoch)
        totals = torch.zeros(3, dtype=torch.float64)
        batches = iter(loader)
        for _ in tqdm(range(n), desc="eval", unit="batch", disable=not self.is_writer, leave=False):
            m = self.backend.eval_step(next(batches))
            totals += torch.tensor([m["loss_sum"], m["tokens"], m["correct"]], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(totals)
        loss = float(totals[0] / max(totals[1], 1))
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700)), "accuracy": float(totals[2] / max(totals[1], 1))}
        baselines = self._count_baselines
        metrics.update(baselines)
        log.info("eval at step %d | loss %.4f | perplexity %.3f | accuracy %.4f%s", self.step, loss,
                 metrics["perplexity"], metrics["accuracy"],
                 " | codon unigram / trigram count-model perplexity {unigram_perplexity:.3f} / "
                 "{trigram_perplexity:.3f}".format(**baselines) if baselines else "")
        self.writers.write("eval", self.step, metrics)
        return metrics

    @functools.cached_property
    def _count_baselines(self) -> dict[str, float]:
        """Codon unigram and trigram count models fitted on (up to BASELINE_CODONS of) the train
        split, perplexity on the eval windows, add-k chosen on them: the floors a model must beat.
        Computed once per run; every evaluation reports them."""
        dataset_cls, _ = dataset_for(self.params.model, self.params.eval_input, self.params.runconfig.seed)
        if dataset_cls is not CausalLMDataset or self.params.train_input is None:
            return {}  # only next-codon loss is comparable with a left-to-right count model
        from modelzoo.data.shards import ShardSet
        from modelzoo.training.baselines import CodonNGram
        train = ShardSet(self.params.train_input.data_dir, verify=False)
        evals = ShardSet(self.params.eval_input.data_dir, verify=False)
        fit = [train[i] for i in range(min(len(train), max(1, BASELINE_CODONS // train.max_seq_length)))]
        scored = [evals[i] for i in range(len(evals))]
        return {f"{name}_perplexity": CodonNGram(n, fit).fit_smoothing(scored).perplexity(scored)
                for n, name in ((1, "unigram"), (3, "trigram"))}

    def load_for_eval(self, path: Path | None) -> None:
        if path is None:
            raise ConfigError(f"runconfig.model_dir: no checkpoint in {self.model_dir} to evaluate "
                              "(train first or pass --checkpoint_path)")
        self.step = int(self._load_into_backend(path, {"model"})["step"])

    def eval_checkpoint(self, path: Path | None) -> dict[str, float]:
        self.load_for_eval(path)
        return self.evaluate()

    def _good_checkpoints(self) -> list[Path]:
        return [p for _, p in ckpt.list_checkpoints(self.model_dir) if ckpt.verify(p) is None]

    def eval_all(self) -> None:
        paths = self._good_checkpoints()
        if not paths:
            self.eval_checkpoint(None)
        for path in paths:
            self.eval_checkpoint(path)

    def close(self) -> None:
        self.writers.close()


@contextlib.contextmanager
def model_dir_errors(model_dir: Path):
    try:
        yield
    except OSError as e:
        raise ConfigError(f"runconfig.model_dir: cannot write to {model_dir} ({e.strerror or e})") from None
