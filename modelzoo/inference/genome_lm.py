"""GenomeLM: a trained model and its tokenizer, with what a user asks of it (see ``modelzoo.inference``).

What depends on the model's objective, its windows, its scoring and generation, is its reader's
(``CausalReader``, ``MaskedReader``), chosen once from the model's spec; everything here is
the same for every model."""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from modelzoo.backends.precision import autocast, precision_on
from modelzoo.config import ModelConfig
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import ConfigError
from modelzoo.inference import embedding, streams
from modelzoo.inference.causal import CausalReader
from modelzoo.inference.embedding import Layer, one_layer
from modelzoo.inference.masked import MaskedReader
from modelzoo.inference.saved import load_saved
from modelzoo.models import CAUSAL_LM, CLASSIFY, MASKED_LM, objective_of, spec_of
from modelzoo.models.base import StagedModel

READERS = {CAUSAL_LM: CausalReader, MASKED_LM: MaskedReader}  # by the spec's objective (a classifier's: masked)


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
        self.reader = READERS[spec_of(config).objective](self)
        self._compute, self.precision_note = precision_on(config, self.device.type)  # the training runs' decision

    @classmethod
    def load(cls, model_dir_or_checkpoint, device: str = "cpu", dtype: torch.dtype | str | None = None) -> "GenomeLM":
        """The newest good checkpoint of a model_dir, or one ``checkpoint_{step}.mdl`` file."""
        model, config, source, step, reading_frame = load_saved(model_dir_or_checkpoint, dtype)
        return cls(model, config, source=source, step=step, device=device, reading_frame=reading_frame)

    @property
    def is_causal(self) -> bool:
        return spec_of(self.config).generates

    @property
    def context(self) -> int:
        """Codons per window (BERT keeps two positions for [CLS] and [SEP])."""
        return self.reader.context

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
        batch_tokens: tokens per batch, padding included (default: 8 full windows): the unit sorted,
            packed and shared among processes; a CPU computes it in forward passes of about 2,048
            tokens. batch_size: at most this many windows per batch (default: batch_tokens decides).
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
        return np.zeros((0, width) if one_layer(layer) else (len(layer), 0, width), dtype=np.float32)

    def embed_stream(self, sequences: Iterable, layer: Layer | Sequence[Layer] | None = None,
                     pooling: str | None = None, batch_size: int | None = None, bf16: bool = False,
                     progress: bool = False, batch_tokens: int | None = None) -> Iterator[tuple[list, np.ndarray]]:
        """``embed`` for inputs of any length (an iterator of records, say), a round of the input
        at a time: yields (sequences, vectors) for consecutive runs of the input, the sequences
        as given and their vectors (``embed``'s layout), in input order. The batches, and so the
        vectors, are those ``embed`` gives for the whole input; under a process group each
        process computes a share of them and every process yields them all."""
        pooling = pooling or self.default_pooling
        embedding.check_pooling(self, pooling)
        if layer is None:
            layer = self.default_layer(pooling)
        layers = self.config.num_hidden_layers
        wanted = [embedding.state_index(layers, k) for k in ([layer] if one_layer(layer) else list(layer))]
        if bf16:
            warnings.warn("embed(bf16=True) is deprecated: precision follows the model config's "
                          "mixed_precision (GenomeLM.precision)", DeprecationWarning, stacklevel=2)
        encode, pieces_of = embedding.reading(self, pooling)
        step = functools.partial(embedding.pooled, self, wanted=wanted, pooling=pooling, bf16=bf16)
        reduce = functools.partial(embedding.means, layer=layer)
        return streams.streamed(self, sequences, pieces_of, step, reduce, batch_size, batch_tokens, progress, "embed",
                                encode)

    @property
    def default_pooling(self) -> str:
        return self.reader.default_pooling

    default_layer = staticmethod(embedding.default_layer)

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

        def reduce(per_sequence):
            totals = np.array([_summed(t for _, (t, _) in found) for _, found in per_sequence])
            counts = np.array([sum(n for _, (_, n) in found) for _, found in per_sequence], dtype=np.int64)
            with np.errstate(invalid="ignore", divide="ignore"):
                return (totals / counts if per_codon_mean else totals), counts  # mean of nothing scored: nan

        return self._scoring(sequences, self.reader.sums, reduce, batch_size, progress, score_unk, batch_tokens)

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

        def reduce(per_sequence):
            arrays = []
            for length, found in per_sequence:
                values = np.full(length, np.nan)
                for piece, result in found:
                    self.reader.place(values, piece, result)
                arrays.append(values)
            return arrays

        return self._scoring(sequences, self.reader.values, reduce, batch_size, progress, score_unk, batch_tokens)

    def _scoring(self, sequences, compute, reduce, batch_size, progress, score_unk, batch_tokens):
        """The stream of the reader's scoring pieces, ``compute``'s results of them reduced per round."""
        pieces_of = functools.partial(self.reader.pieces, score_unk=score_unk)
        step = functools.partial(compute, score_unk=score_unk)
        return streams.streamed(self, sequences, pieces_of, step, reduce, batch_size, batch_tokens, progress, "score")

    # ------------------------------------------------------------------ generation

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
        is tested against). A masked model (BERT) refuses.
        """
        self._need_token_head("generate")
        return self.reader.generate(prompt, max_codons=max_codons, temperature=temperature, top_k=top_k,
                                    top_p=top_p, num_return_sequences=num_return_sequences, seed=seed,
                                    stop_at_stop_codon=stop_at_stop_codon, batch_size=batch_size,
                                    use_cache=use_cache, progress=progress)

    # ------------------------------------------------------------------ shared plumbing

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
        return self.reader.windows(ids)

    def _need_token_head(self, what: str) -> None:
        key = spec_of(self.config).classifier_key
        if objective_of(self.config) == CLASSIFY:
            raise ConfigError(f"{self.source}: {what} needs codon probabilities; this checkpoint is a "
                              f"sequence classifier (model.{key} {getattr(self.config, key)})")

    def _scored(self, ids: np.ndarray, score_unk: bool) -> np.ndarray:
        """Which positions hold a codon (or an [UNK], with ``score_unk``)."""
        codon = np.isin(ids, self.tokenizer.codon_ids)
        return codon | (ids == self.tokenizer.unk_id) if score_unk else codon

    @property
    def precision(self) -> str:
        """The dtype the model computes in: the model config's fp16_type where its mixed_precision
        holds on this device (on a CPU as model.mixed_precision_on_cpu decides, measured once:
        ``backends.precision.precision_on``, the training runs' rule), else float32."""
        return self._compute.fp16_type if self._compute.mixed_precision else "float32"

    def token_logits(self, packed) -> torch.Tensor:
        """The model's logits over a packed batch, in the precision it computes in."""
        with self._autocast(False):
            return self.model(packed.batch)["logits"]

    def _autocast(self, bf16: bool):
        if bf16:  # the deprecated embed(bf16=True)
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        if not self._compute.mixed_precision:  # nothing entered: a caller's own autocast still holds
            return contextlib.nullcontext()
        return autocast(self.device.type, self._compute)


def _summed(values: Iterable[float]) -> float:
    """Left to right in float64, whatever the Python (3.12's sum() compensates): the same bytes
    in every process."""
    total = 0.0
    for v in values:
        total += v
    return total
