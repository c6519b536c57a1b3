"""Use a trained model: embed genomes, generate codon sequences, score log-likelihoods.

    from modelzoo import GenomeLM
    lm = GenomeLM.load("model_dir/quickstart")          # newest good checkpoint, or a checkpoint file
    vectors = lm.embed([genome_a, genome_b])             # (2, hidden_size) numpy
    sequences = lm.generate("ATG", max_codons=300, seed=0, stop_at_stop_codon=True)
    nats = lm.log_likelihood([genome_a])                 # total log-probability per sequence
    per_codon = lm.codon_log_probs([genome_a])           # [array of each codon's log-probability]
    for records, vectors in lm.embed_stream(read_records("many.fasta.gz")):  # a round at a time
        ...                                              # (log_likelihood_stream likewise)

Sequences are nucleotide strings (or ``Record``s from ``modelzoo.data.sequences.read_records``,
whose ids then name the record in errors), read with ``CodonTokenizer``'s rules in the reading
frame the model was trained on (its train_input.reading_frame: from the first nucleotide, or in
the frame of the longest stop-free run of codons; ``GenomeLM.reading_frame``). Codons with N or
another ambiguity code become [UNK]: the model sees them as input, but they are neither pooled
into embeddings nor scored (no codon was observed), except in GenSLM's recipes, for numbers
comparable with GenSLM's: ``embed(pooling="genslm")`` and ``log_likelihood(score_unk=True)``.

Genomes longer than the model's context are cut into windows the way training cut them:
consecutive windows of ``max_position_embeddings`` codons for GPT-2/GPT-J/GPT-NeoX, and of two codons
fewer framed by [CLS] ... [SEP] for BERT. The streams read their input a round at a time (memory
holds a round, never the input): its windows sorted by length into batches of ``batch_tokens``,
short ones sharing a row with document attention (``inference_batching``), each sequence's
results its own alone, in input order. Under a process group (torchrun, or the tools'
``--num_workers_per_node``) every process computes a share of the batches and yields them all.
The model computes in the precision its config decides for this device, as training does
(``GenomeLM.precision``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import numpy as np
import torch
import yaml
from pydantic import ValidationError
from tqdm import tqdm

from modelzoo import inference_batching as batching
from modelzoo.backends.base import autocast, precision_on
from modelzoo.config import ModelConfig
from modelzoo.data.tokenizer import READING_FRAMES, CodonTokenizer
from modelzoo.errors import CheckpointError, ConfigError, DataError
from modelzoo.inference_batching import Packed, Piece
from modelzoo.models import CAUSAL_LM, CLASSIFY, MODELS, build_model, objective_of, spec_of
from modelzoo.models.base import StagedModel
from modelzoo.models.layers import KVCache
from modelzoo.training import checkpoint as ckpt

STOP_CODONS = ("TAA", "TAG", "TGA")
POOLINGS = ("surprise", "mean", "cls", "genslm")
SURPRISE_LAYER = 0  # the layer surprise pooling reads by default: which codons surprised the model
Layer = Union[int, str]  # a boundary activation's index, or "final"
DEFAULT_BATCH_WINDOWS = 8  # batch_tokens by default: this many windows of the model's full context


class GenomeLM:
    """A trained model (GPT-2, GPT-J, GPT-NeoX, BERT) with its codon tokenizer, in eval mode, gradients off."""

    def __init__(self, model: StagedModel, config: ModelConfig, source: str = "<model>", step: int | None = None,
                 device: str | torch.device = "cpu", tokenizer: CodonTokenizer | None = None,
                 reading_frame: str = "as_read"):
        self.model = model.to(device).eval()
        self.reading_frame = reading_frame
        self.config = config
        self.source, self.step = source, step
        self.device = torch.device(device)
        self.tokenizer = tokenizer or CodonTokenizer()
        self._codon_ids = torch.as_tensor(self.tokenizer.codon_ids.astype(np.int64), device=self.device)
        self._stop_ids = torch.as_tensor([int(self.tokenizer.encode(c)[0]) for c in STOP_CODONS], device=self.device)
        self._compute, self.precision_note = precision_on(config, self.device.type)  # the training runs' decision

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, model_dir_or_checkpoint, device: str = "cpu", dtype: torch.dtype | str | None = None) -> "GenomeLM":
        """The newest good checkpoint of a model_dir, or one ``checkpoint_{step}.mdl`` file."""
        path = Path(model_dir_or_checkpoint)
        if path.is_dir():
            found = ckpt.newest_good_checkpoint(path)
            if found is None:
                raise CheckpointError(f"{path}: no good checkpoint_{{step}}.mdl in this model_dir (train first)")
            path = found
        elif not path.exists():
            raise CheckpointError(f"{path}: no such model_dir or checkpoint file")
        state = ckpt.load_checkpoint(path)
        saved = _saved_params(state, path)
        config = _model_config(saved, path)
        model = build_model(config)
        with_shapes = {k: v.shape for k, v in model.state_dict().items()}
        ckpt.check_model_state(path, state["model"], with_shapes)
        model.load_state_dict(state["model"])
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ConfigError(f"dtype {dtype!r}: not a torch dtype (e.g. 'bfloat16', 'float32')")
            dtype = getattr(torch, dtype)
        if dtype is not None:
            model = model.to(dtype)
        return cls(model, config, source=str(path), step=state.get("step"), device=device,
                   reading_frame=_reading_frame(saved))

    @property
    def is_causal(self) -> bool:
        return spec_of(self.config).generates

    @property
    def context(self) -> int:
        """Codons per window (BERT keeps two positions for [CLS] and [SEP])."""
        n = self.config.max_position_embeddings
        return n if self.is_causal else n - 2

    # ------------------------------------------------------------------ embeddings

    def embed(self, sequences: Sequence, layer: Layer | Sequence[Layer] | None = None, pooling: str | None = None,
              batch_size: int | None = None, bf16: bool = False, progress: bool = False,
              batch_tokens: int | None = None) -> np.ndarray:
        """One vector per sequence: (n, hidden_size) float32.

        layer: index into the boundary activations (0 = embeddings, k = after block k, -1 = last
            block), or "final": the output of the model's final norm (the last block's output
            normalised, what GPT heads read; BERT, which normalises at the end of every block, has
            no other, so there it is -1); a list of layers gives (len(layers), n, hidden_size) from
            one pass. Default: 0 for surprise pooling, "final" for genslm, else -1.
        pooling: "surprise" (GPT models; their default) weights each codon's activation by the
            square of its surprisal under the model, -log p(codon | the codons before it), so the
            vector is about the codons the model did not expect (a variant's mutations against the
            genomes it learned) rather than the thousands every genome shares; "mean" averages the
            layer over every codon position of every window; "cls" (BERT) averages the [CLS]
            position over the windows; "genslm" (GPT models) is GenSLM's recipe exactly (its
            inference callback): the sequence tokenised as GenSLM does (``encode(genslm=True)``,
            from the first nucleotide), only its first ``max_position_embeddings`` tokens, one
            window, every non-pad position averaged ([UNK] included). Default: surprise for GPT
            models, mean for BERT.
        batch_tokens: tokens per forward pass, padding included (default: 8 full windows);
            batch_size: at most this many windows per pass (default: no limit but batch_tokens).
            Short sequences share a window (packed, each attending only to itself): the results
            are each sequence's alone, whatever the batches.
        bf16: deprecated (precision follows the model config, ``precision``): computes under
            bfloat16 autocast whatever the config says.
        """
        blocks = [vectors for _, vectors in self.embed_stream(sequences, layer, pooling, batch_size, bf16, progress,
                                                              batch_tokens)]
        if blocks:
            return np.concatenate(blocks, axis=-2)
        width = self.config.hidden_size
        return np.zeros((0, width) if _one_layer(layer) else (len(layer), 0, width), dtype=np.float32)

    def embed_stream(self, sequences: Iterable, layer: Layer | Sequence[Layer] | None = None,
                     pooling: str | None = None, batch_size: int | None = None, bf16: bool = False,
                     progress: bool = False, batch_tokens: int | None = None) -> Iterator[tuple[list, np.ndarray]]:
        """``embed`` for inputs of any length (an iterator of records, say), a round of the input
        at a time: yields (sequences, vectors) for consecutive runs of the input, the sequences
        as given and their vectors (``embed``'s layout), in input order. The batches, and so the
        vectors, are those ``embed`` gives for the whole input; under a process group each
        process computes a share of them and every process yields them all."""
        pooling = pooling or self.default_pooling
        self._check_pooling(pooling)
        if layer is None:
            layer = self.default_layer(pooling)
        wanted = [self._state_index(k) for k in ([layer] if _one_layer(layer) else list(layer))]
        if bf16:
            warnings.warn("embed(bf16=True) is deprecated: precision follows the model config's "
                          "mixed_precision (GenomeLM.precision)", DeprecationWarning, stacklevel=2)
        if pooling == "genslm":
            encoded, pieces_of = self._encoded_as_genslm, lambda ids: [Piece(ids)]
        else:
            encoded, pieces_of = self._encoded, lambda ids: map(Piece, self._windows(ids))

        def reduce(per_sequence):
            means = []
            for _, found in per_sequence:
                sums, counts = found[0][1]
                for _, (s, c) in found[1:]:
                    sums, counts = sums + s, counts + c
                means.append((sums / counts).float().numpy())  # (layers, hidden)
            vectors = np.stack(means)
            return vectors[:, 0] if _one_layer(layer) else vectors.transpose(1, 0, 2)

        step = functools.partial(self._pooled, wanted=wanted, pooling=pooling, bf16=bf16)
        return self._streamed(sequences, pieces_of, step, reduce, batch_size, batch_tokens, progress, "embed", encoded)

    def _pooled(self, packed: Packed, wanted: list[int], pooling: str, bf16: bool) -> list:
        """Each piece's pooled layers, weighted (float64 sums, layers x hidden) and its total weight."""
        blocks_out = self.config.num_hidden_layers  # the state index of the last block's output
        final = blocks_out + 1  # layer "final"'s index: where the head's output would be
        kept = {blocks_out if k == final else k for k in wanted}
        needed = len(self.model.stages()) if pooling == "surprise" else max(kept) + 1
        with self._autocast(bf16):
            states = self._states(packed.batch, needed, kept)
            if final in wanted:
                states[final] = self._final_norm(states[blocks_out])
        codon = torch.from_numpy(self._scored(packed.input_ids.cpu().numpy(), False).reshape(-1)).float()
        if pooling == "cls":
            weights = torch.zeros_like(codon)
            weights[packed.starts()] = 1
        elif pooling == "surprise":
            weights = self._surprise_weights(packed, states["logits"], codon)
        elif pooling == "genslm":  # GenSLM averages every position its attention mask keeps
            weights = (packed.piece_of >= 0).float()
        else:
            weights = codon
        width = self.config.hidden_size
        pooled = torch.stack([packed.per_piece(states[k].float().reshape(-1, width).cpu(), weights) for k in wanted], 1)
        return list(zip(pooled, packed.per_piece(weights)))

    def _check_pooling(self, pooling: str) -> None:
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
        if pooling == "cls" and self.is_causal:
            raise ConfigError(f"pooling 'cls' needs a BERT model; this is {self.config.name} (use 'mean')")
        if pooling in ("surprise", "genslm") and not self.is_causal:
            raise ConfigError(f"pooling {pooling!r} needs a GPT model; this is {self.config.name} (use 'mean' or 'cls')")
        if pooling == "surprise":
            self._need_token_head("pooling 'surprise'")

    def _state_index(self, layer: Layer) -> int:
        """0..num_hidden_layers for a boundary activation, num_hidden_layers + 1 for "final"."""
        num_states = self.config.num_hidden_layers + 1
        if layer == "final":
            return num_states
        if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and -num_states <= layer < num_states:
            return int(layer) % num_states
        raise ConfigError(f"layer {layer!r}: this model has layers 0..{num_states - 1} (or -1..-{num_states}) "
                          f"and 'final'")

    def _final_norm(self, last_block: torch.Tensor) -> torch.Tensor:
        """The final norm's output: the head's ``ln_f`` (every GPT's); a model without one (BERT
        normalises at the end of each block) gives its last block's output."""
        norm = getattr(self.model.stages()[-1], "ln_f", None)
        return last_block if norm is None else norm(last_block)

    def _encoded_as_genslm(self, sequences: Iterable) -> Iterator[tuple[object, np.ndarray]]:
        """Each sequence with GenSLM's ids of it, cut to the model's first max_position_embeddings."""
        for k, item in enumerate(sequences):
            name, seq = (item.id, item.seq) if hasattr(item, "seq") else (f"#{k}", item)
            ids = self.tokenizer.encode(seq, genslm=True)[: self.config.max_position_embeddings].astype(np.int64)
            if not len(ids):
                raise DataError(f"sequence {name}: empty (GenSLM's recipe has no token to average)")
            yield item, ids

    @property
    def default_pooling(self) -> str:
        return "surprise" if objective_of(self.config) == CAUSAL_LM else "mean"

    @staticmethod
    def default_layer(pooling: str) -> Layer:
        """The layer ``embed`` pools by default: the codon embeddings for surprise pooling (which
        codons surprised the model), the final norm's output for GenSLM's recipe, else the last block."""
        return {"surprise": SURPRISE_LAYER, "genslm": "final"}.get(pooling, -1)

    @staticmethod
    def _surprise_weights(packed: Packed, logits: torch.Tensor, codon: torch.Tensor) -> torch.Tensor:
        """Per token: its surprisal squared, (-log p(codon | earlier codons of its piece))^2, on
        the CPU; a piece's first codon (nothing predicts it) and non-codons get none. A small
        floor keeps a sequence the model predicts perfectly at its mean."""
        return _next_token_log_probs(packed, logits).square() * packed.follows() * codon + 1e-6 * codon

    def _states(self, batch: dict, n_stages: int, kept: set[int]) -> dict:
        """The activations after those of the first ``n_stages`` stages named in ``kept`` (0: the
        token embeddings), and the head's "logits" when every stage runs."""
        hidden, states = None, {}
        for k, stage in enumerate(self.model.stages()[:n_stages]):
            hidden = stage(hidden, batch)
            if k in kept:
                states[k] = hidden
        if n_stages == len(self.model.stages()):
            states["logits"] = hidden["logits"]
        return states

    # ------------------------------------------------------------------ log-likelihood

    def log_likelihood(self, sequences: Sequence, per_codon_mean: bool = False, batch_size: int | None = None,
                       progress: bool = False, return_counts: bool = False, score_unk: bool = False,
                       batch_tokens: int | None = None):
        """Log-probability in nats of each sequence's codons, summed (or averaged per scored codon).

        Causal models score each codon given the ones before it in its window; windows overlap
        by one codon so that every codon but the first is scored. BERT gives the
        pseudo-log-likelihood: each codon is masked in turn and scored from both sides. [UNK]
        codons are not scored (no codon was observed); a sequence with nothing to score gets 0
        (mean: nan). Batches as ``embed``'s (batch_tokens, batch_size).
        score_unk: score [UNK] targets too, as GenSLM's loss does (the log-probability of the
            [UNK] token there), for numbers comparable with GenSLM's. (GenSLM also reads one more
            [UNK] for a trailing partial codon, and only a model's first context of codons.)
        return_counts: also return the number of scored codons per sequence.
        """
        blocks = [scores for _, scores in self.log_likelihood_stream(sequences, per_codon_mean, batch_size, progress,
                                                                    score_unk, batch_tokens)]
        values, counts = (np.concatenate(part) for part in zip(*blocks)) if blocks else \
            (np.zeros(0), np.zeros(0, dtype=np.int64))
        return (values, counts) if return_counts else values

    def log_likelihood_stream(self, sequences: Iterable, per_codon_mean: bool = False, batch_size: int | None = None,
                              progress: bool = False, score_unk: bool = False, batch_tokens: int | None = None
                              ) -> Iterator[tuple[list, tuple[np.ndarray, np.ndarray]]]:
        """``log_likelihood`` for inputs of any length, a round at a time: yields (sequences,
        (values, scored codon counts)) for consecutive runs of the input, in input order (see
        ``embed_stream``); the values are those ``log_likelihood`` gives for the whole input."""
        self._need_token_head("log_likelihood")
        if self.is_causal:
            pieces_of, step = self._causal_pieces, functools.partial(self._causal_sums, score_unk=score_unk)
        else:
            pieces_of, step = functools.partial(self._masked_pieces, score_unk=score_unk), self._masked_sums

        def reduce(per_sequence):
            totals = np.array([_summed(t for _, (t, _) in found) for _, found in per_sequence])
            counts = np.array([sum(n for _, (_, n) in found) for _, found in per_sequence], dtype=np.int64)
            with np.errstate(invalid="ignore", divide="ignore"):
                return (totals / counts if per_codon_mean else totals), counts  # mean of nothing scored: nan

        return self._streamed(sequences, pieces_of, step, reduce, batch_size, batch_tokens, progress, "score")

    def codon_log_probs(self, sequences: Sequence, batch_size: int | None = None, progress: bool = False,
                        score_unk: bool = False, batch_tokens: int | None = None) -> list[np.ndarray]:
        """Log-probability in nats of every codon of each sequence, as ``log_likelihood`` scores
        it (GPT: given the earlier codons of its window; BERT: masked, from both sides): one
        float64 array per sequence, one entry per codon as read (index = 0-based codon position in
        the model's reading frame, ``codons``),
        NaN where a codon is not scored (GPT: the first codon; any model: [UNK] codons, unless
        ``score_unk``). So ``np.nansum`` of a sequence's array is its ``log_likelihood``.
        """
        return [values for _, arrays in self.codon_log_probs_stream(sequences, batch_size, progress, score_unk,
                                                                    batch_tokens) for values in arrays]

    def codon_log_probs_stream(self, sequences: Iterable, batch_size: int | None = None, progress: bool = False,
                               score_unk: bool = False, batch_tokens: int | None = None
                               ) -> Iterator[tuple[list, list[np.ndarray]]]:
        """``codon_log_probs`` for inputs of any length, a round at a time: yields (sequences, their
        per-codon arrays) for consecutive runs of the input, in input order (the batches are
        ``log_likelihood_stream``'s)."""
        self._need_token_head("codon_log_probs")
        if self.is_causal:
            pieces_of, step = self._causal_pieces, functools.partial(self._causal_values, score_unk=score_unk)
        else:
            pieces_of, step = functools.partial(self._masked_pieces, score_unk=score_unk), self._masked_sums

        def reduce(per_sequence):
            arrays = []
            for length, found in per_sequence:
                values = np.full(length, np.nan)
                for piece, result in found:
                    if self.is_causal:
                        values[piece.place: piece.place + len(result)] = result
                    else:
                        values[piece.place] = result[0]
                arrays.append(values)
            return arrays

        return self._streamed(sequences, pieces_of, step, reduce, batch_size, batch_tokens, progress, "score")

    def _causal_pieces(self, ids: np.ndarray) -> Iterator[Piece]:
        """Windows overlapping by one codon, so that every codon but the first is scored; each
        placed at the codon index of its first scored codon (its second)."""
        stride = max(1, self.context - 1)
        return (Piece(ids[s: s + self.context], place=s + 1) for s in range(0, max(len(ids) - 1, 1), stride))

    def _causal_log_probs(self, packed: Packed, score_unk: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token (flattened, on the CPU): its log-probability given the tokens before it in its
        piece, and whether it is scored (a codon, or [UNK] with ``score_unk``, not a piece's first)."""
        with self._autocast(False):
            logits = self.model(packed.batch)["logits"]
        scored = torch.from_numpy(self._scored(packed.input_ids.cpu().numpy(), score_unk).reshape(-1))
        return _next_token_log_probs(packed, logits), scored & packed.follows()

    def _causal_sums(self, packed: Packed, score_unk: bool) -> list[tuple[float, int]]:
        """Each piece's summed log-probability and scored codons."""
        logp, scored = self._causal_log_probs(packed, score_unk)
        totals, counts = packed.per_piece(logp, scored), packed.per_piece(scored)
        return list(zip(totals.tolist(), counts.long().tolist()))

    def _causal_values(self, packed: Packed, score_unk: bool) -> list[np.ndarray]:
        """Each piece's log-probabilities of its codons after the first (NaN: not scored)."""
        logp, scored = self._causal_log_probs(packed, score_unk)
        values = torch.where(scored, logp.double(), math.nan).numpy()
        return [values[start + 1: end] for start, end in packed.spans]

    def _masked_pieces(self, ids: np.ndarray, score_unk: bool = False) -> Iterator[Piece]:
        """One piece per (window, scored codon): the framed window with that codon masked, placed
        at the codon's index in the sequence."""
        for k, w in enumerate(self._windows(ids)):
            for p in np.flatnonzero(self._scored(w, score_unk)):
                yield Piece(w, place=k * self.context + int(p) - 1, mask_at=int(p))  # p counts [CLS]

    def _masked_sums(self, packed: Packed) -> list[tuple[float, int]]:
        """Log-probability of each piece's masked codon, from both sides (and 1 codon scored)."""
        with self._autocast(False):
            logits = self.model(packed.batch)["logits"]
        at = torch.tensor(packed.masked, device=self.device)
        targets = torch.tensor(packed.targets, device=self.device)
        logp = logits.reshape(-1, logits.shape[-1])[at].float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        return [(value, 1) for value in logp.double().cpu().tolist()]

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompt: str = "ATG", max_codons: int = 100, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, num_return_sequences: int = 1,
                 seed: int | None = None, stop_at_stop_codon: bool = False, batch_size: int = 32,
                 use_cache: bool = True, progress: bool = False) -> list[str]:
        """Sample ``max_codons`` codons after ``prompt``; returns prompt + generated nucleotides.

        Only codons are sampled (special tokens are masked out). temperature 0 is greedy. With a
        seed the output is reproducible (for the same batch_size). stop_at_stop_codon ends a
        sequence after its first in-frame TAA/TAG/TGA (kept). Past the model's context the
        window slides: the newest half of the context is kept and decoding goes on from there.
        use_cache=False recomputes the whole window for every codon (the reference the KV cache
        is tested against).
        """
        self._need_token_head("generate")
        if not self.is_causal:
            causal = ", ".join(name for name, spec in MODELS.items() if spec.generates)
            raise ConfigError(f"{self.source}: generate needs a causal model ({causal}); this checkpoint is "
                              f"{self.config.name}")
        prompt_ids = self._prompt_ids(prompt)
        _check_sampling(max_codons, temperature, top_k, top_p, num_return_sequences, batch_size)
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        out = []
        bar = tqdm(total=num_return_sequences * max_codons, desc="generate", unit=" codons",
                   disable=None if progress else True)
        with bar:
            for first in range(0, num_return_sequences, batch_size):
                rows = min(batch_size, num_return_sequences - first)
                tokens, lengths = self._sample_rows(prompt_ids, rows, max_codons, generator, use_cache,
                                                    dict(temperature=temperature, top_k=top_k, top_p=top_p),
                                                    stop_at_stop_codon, bar)
                out += [self.tokenizer.decode(t[:n]) for t, n in zip(tokens.cpu().numpy(), lengths)]
        return out

    def _sample_rows(self, prompt_ids, rows, max_codons, generator, use_cache, sampling, stop_at_stop, bar):
        tokens = prompt_ids.repeat(rows, 1)
        lengths = [len(prompt_ids) + max_codons] * rows
        stopped = torch.zeros(rows, dtype=torch.bool, device=self.device)
        start, cache = 0, None
        for step in range(max_codons):
            window_start = _slide(start, tokens.shape[1], self.config.max_position_embeddings)
            if not use_cache:
                logits = self.model({"input_ids": tokens[:, window_start:]})["logits"]
            else:
                if cache is None or window_start != start:  # (re)fill the cache with the whole window
                    cache, feed = KVCache(), tokens[:, window_start:]
                else:
                    feed = tokens[:, -1:]
                logits = self.model({"input_ids": feed, "cache": cache})["logits"]
            start = window_start
            codon = self._sample(logits[:, -1].float(), generator, **sampling)
            tokens = torch.cat((tokens, codon[:, None]), dim=1)
            bar.update(rows)
            if stop_at_stop:
                ends = torch.isin(codon, self._stop_ids) & ~stopped
                for r in ends.nonzero().flatten().tolist():
                    lengths[r] = tokens.shape[1]
                stopped |= ends
                if stopped.all():
                    bar.update(rows * (max_codons - step - 1))
                    break
        return tokens, lengths

    def _sample(self, logits, generator, temperature, top_k, top_p) -> torch.Tensor:
        """Next codon per row; every non-codon token gets probability zero."""
        only_codons = torch.full_like(logits, -math.inf)
        only_codons[:, self._codon_ids] = 0.0
        logits = logits + only_codons
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p is not None and top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the likelier codons
            drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
            logits = logits.masked_fill(drop, -math.inf)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    def _prompt_ids(self, prompt: str) -> torch.Tensor:
        text = "".join(prompt.split())
        ids = self.tokenizer.encode(text)
        if not text or len(text) % 3 or not np.isin(ids, self.tokenizer.codon_ids).all():
            raise ConfigError(f"prompt {prompt[:30]!r}: need one or more whole codons of A/C/G/T (e.g. 'ATG')")
        return torch.as_tensor(ids.astype(np.int64), device=self.device)

    # ------------------------------------------------------------------ shared plumbing

    def _need_token_head(self, what: str) -> None:
        key = spec_of(self.config).classifier_key
        if objective_of(self.config) == CLASSIFY:
            raise ConfigError(f"{self.source}: {what} needs codon probabilities; this checkpoint is a "
                              f"sequence classifier (model.{key} {getattr(self.config, key)})")

    def _encoded(self, sequences: Iterable) -> Iterator[tuple[object, np.ndarray]]:
        """Each sequence as given, with its codon ids."""
        for k, item in enumerate(sequences):
            name, seq = (item.id, item.seq) if hasattr(item, "seq") else (f"#{k}", item)
            ids = self.tokenizer.encode(seq, self.reading_frame).astype(np.int64)
            if not np.isin(ids, self.tokenizer.codon_ids).any():
                raise DataError(f"sequence {name}: no whole A/C/G/T codon to read")
            yield item, ids

    def codons(self, seq: str | bytes) -> tuple[list[str], int]:
        """A sequence's whole codons as this model reads them (upper case letters, in its reading
        frame), and the nucleotides dropped before the first (0 unless reading_frame longest_orf)."""
        if isinstance(seq, bytes):
            seq = seq.decode("latin-1")
        seq = "".join(seq.split()).upper()
        offset = self.tokenizer.frame_offset(seq, self.reading_frame)
        return [seq[i: i + 3] for i in range(offset, len(seq) - 2, 3)], offset

    def _windows(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        """The model-sized windows of one sequence (framed [CLS] ... [SEP] for BERT)."""
        for s in range(0, len(ids), self.context):
            w = ids[s: s + self.context]
            if self.is_causal:
                yield w
            else:
                yield np.concatenate(([self.tokenizer.cls_id], w, [self.tokenizer.sep_id]))

    def _scored(self, ids: np.ndarray, score_unk: bool) -> np.ndarray:
        """Which positions hold a codon (or an [UNK], with ``score_unk``)."""
        codon = np.isin(ids, self.tokenizer.codon_ids)
        return codon | (ids == self.tokenizer.unk_id) if score_unk else codon

    def _streamed(self, sequences: Iterable, pieces_of, step, reduce, batch_size: int | None,
                  batch_tokens: int | None, progress: bool, desc: str, encoded=None) -> Iterator[tuple[list, object]]:
        """The results of an input of any length, a round at a time (``inference_batching``):
        ``encoded(sequences)`` gives (sequence, ids) pairs (default ``_encoded``), ``pieces_of(ids)``
        one sequence's pieces, ``step(packed)`` a result per piece of a packed batch, and
        ``reduce([(codons, [(piece, result), ...]) per sequence])`` a round's block. Yields
        (sequences as given, block) in input order."""
        if isinstance(sequences, (str, bytes)):
            raise ConfigError("sequences: pass a list of sequences, not one string")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size {batch_size}: must be >= 1")
        if batch_tokens is not None and batch_tokens < 1:
            raise ConfigError(f"batch_tokens {batch_tokens}: must be >= 1")
        tokens = batch_tokens or DEFAULT_BATCH_WINDOWS * self.config.max_position_embeddings
        return self._rounds(encoded or self._encoded, sequences, pieces_of, step, reduce, batch_size, tokens,
                            progress, desc)

    @torch.no_grad()
    def _rounds(self, encoded, sequences, pieces_of, step, reduce, batch_size, tokens, progress, desc):
        lengths: list[int] = []  # codons of each sequence of the round

        def read():
            for item, ids in encoded(sequences):
                lengths.append(len(ids))
                yield item, ids

        most = None if batch_size is None else batch_size * batching.ROUND_BATCHES
        total = len(sequences) if hasattr(sequences, "__len__") else None
        quiet = not progress or batching.rank_and_world()[0] > 0  # one bar for a group: process 0's
        with tqdm(total=total, desc=desc, unit=" sequences", disable=True if quiet else None) as bar:
            for items, pieces in batching.rounds(read(), pieces_of, batching.round_work(tokens), most):
                found = batching.results(pieces, step, tokens, batch_size, self.tokenizer.pad_id,
                                         self.tokenizer.mask_id, self.device)
                per_sequence = [(n, []) for n in lengths[:len(items)]]
                del lengths[:len(items)]
                for piece, result in zip(pieces, found):
                    per_sequence[piece.owner][1].append((piece, result))
                yield items, reduce(per_sequence)
                bar.update(len(items))

    @property
    def precision(self) -> str:
        """The dtype the model computes in: the model config's fp16_type where its mixed_precision
        holds on this device (on a CPU as model.mixed_precision_on_cpu decides, measured once:
        ``backends.base.precision_on``, the training runs' rule), else float32."""
        return self._compute.fp16_type if self._compute.mixed_precision else "float32"

    def _autocast(self, bf16: bool):
        if bf16:  # the deprecated embed(bf16=True)
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        if not self._compute.mixed_precision:  # nothing entered: a caller's own autocast still holds
            return contextlib.nullcontext()
        return autocast(self.device.type, self._compute)


def _saved_params(state: dict, path: Path) -> dict:
    """The params saved in the checkpoint, as a mapping with a model section (the data paths may be gone)."""
    try:
        raw = yaml.safe_load(state["params"])
    except (KeyError, TypeError, ValueError, RecursionError, yaml.YAMLError):
        raw = None
    if not isinstance(raw, dict) or "model" not in raw:
        raise CheckpointError(f"{path}: checkpoint holds no params with a model section")
    for name in ("train_input", "eval_input"):  # where the reading frame is read from
        section = raw.get(name)
        if section is not None and not isinstance(section, dict):
            raise CheckpointError(f"{path}: saved params {name}: {section!r:.60} is not a section")
        frame = (section or {}).get("reading_frame", "as_read")
        if frame not in READING_FRAMES:
            raise CheckpointError(f"{path}: saved params {name}.reading_frame: {frame!r:.60} is not one of "
                                  f"{', '.join(READING_FRAMES)}")
    return raw


def _model_config(raw: dict, path: Path) -> ModelConfig:
    """The saved params' model section."""
    try:
        return ModelConfig.model_validate(raw["model"])
    except ValidationError as e:
        first = e.errors()[0]
        where = "".join(f".{x}" for x in first["loc"])
        raise CheckpointError(f"{path}: saved params model{where}: {first['msg']}") from None


def _reading_frame(raw: dict) -> str:
    """The reading frame of the saved params' training (else evaluation) data; as_read for
    checkpoints from before the setting."""
    section = raw.get("train_input") or raw.get("eval_input") or {}
    return section.get("reading_frame", "as_read")


def parse_layer(text: str) -> Layer:
    """A --layer flag: an integer index, or "final"."""
    if text == "final":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: an integer layer index or 'final'") from None


def _one_layer(layer) -> bool:
    """Whether embed's ``layer`` names one layer (an index or "final") rather than a list."""
    return isinstance(layer, (int, np.integer, str))


def _next_token_log_probs(packed: Packed, logits: torch.Tensor) -> torch.Tensor:
    """Per flattened token of a packed batch (on the CPU, float32): the log-probability the
    logits of the token before it in its row give it (0 for a row's first token; whether that
    token is of the same piece is ``packed.follows()``)."""
    ids = packed.input_ids
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].cpu()
    return torch.cat((logp.new_zeros(len(logp), 1), logp), 1).reshape(-1)


def _summed(values: Iterable[float]) -> float:
    """Left to right in float64, whatever the Python (3.12's sum() compensates): the same bytes
    in every process."""
    total = 0.0
    for v in values:
        total += v
    return total


def _slide(start: int, length: int, context: int) -> int:
    """First token of the window the next codon is predicted from: unchanged while the tokens
    fit the context, else jump so that the newest half of the context is kept."""
    return start if length - start <= context else length - max(1, context // 2)


MAX_GENERATED = 10 ** 6  # codons per sequence, and sequences: generate holds them all in memory


def _check_sampling(max_codons, temperature, top_k, top_p, num_return_sequences, batch_size) -> None:
    problems = [(not 1 <= max_codons <= MAX_GENERATED, f"max_codons {max_codons}: must be 1 to {MAX_GENERATED:,}"),
                (not 0 <= temperature < math.inf, f"temperature {temperature}: must be a finite number >= 0 "
                                                  f"(0 = greedy)"),
                (top_k is not None and top_k < 1, f"top_k {top_k}: must be >= 1"),
                (top_p is not None and not 0 < top_p <= 1, f"top_p {top_p}: must be in (0, 1]"),
                (not 1 <= num_return_sequences <= MAX_GENERATED,
                 f"num_return_sequences {num_return_sequences}: must be 1 to {MAX_GENERATED:,}"),
                (batch_size < 1, f"batch_size {batch_size}: must be >= 1")]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)


# ---------------------------------------------------------------------- for the command-line tools
# (python -m modelzoo.tools.embed / generate / score share their model flags and error handling)

def add_model_arguments(parser, overwrite: str | None = None, packed: bool = False) -> None:
    """The model flags; ``overwrite``: the help of an --overwrite flag, for a tool with an output;
    ``packed``: a tool reading records through GenomeLM's streams (packed batches of
    --batch_tokens, --batch_size a cap, --num_workers_per_node)."""
    parser.add_argument("--model_dir", help="model_dir of a training run (its newest good checkpoint is used)")
    parser.add_argument("--checkpoint_path", help="use this checkpoint file instead of the newest in model_dir")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    if packed:
        parser.add_argument("--batch_tokens", type=int, default=None,
                            help=f"tokens per forward pass, padding included (default: {DEFAULT_BATCH_WINDOWS} "
                                 f"windows of the model's context); short records share a window")
        parser.add_argument("--batch_size", type=int, default=None,
                            help="at most this many windows per forward pass (default: --batch_tokens decides)")
        parser.add_argument("--num_workers_per_node", type=int, default=1,
                            help="processes on this machine (each its own GPU with --device cuda), each "
                                 "computing a share of the batches; the output is the same bytes")
    else:
        parser.add_argument("--batch_size", type=int, default=8, help="windows (or sequences) per forward pass")
    if overwrite:
        parser.add_argument("--overwrite", action="store_true", help=overwrite)


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


MAX_BATCH = 1 << 20  # windows per forward pass: far past any memory, short of overflowing anything
MAX_BATCH_TOKENS = 1 << 32  # tokens per forward pass, likewise


def model_from_args(args) -> GenomeLM:
    if not (args.checkpoint_path or args.model_dir):
        raise ConfigError("--model_dir (or --checkpoint_path) is required")
    if args.batch_size is not None and not 1 <= args.batch_size <= MAX_BATCH:  # None: no cap
        raise ConfigError(f"--batch_size {args.batch_size}: must be 1 to {MAX_BATCH:,}")
    tokens = getattr(args, "batch_tokens", None)
    if tokens is not None and not 1 <= tokens <= MAX_BATCH_TOKENS:
        raise ConfigError(f"--batch_tokens {tokens}: must be 1 to {MAX_BATCH_TOKENS:,}")
    return GenomeLM.load(args.checkpoint_path or args.model_dir, device=_device(args.device))

