"""How GPT-2, GPT-J and GPT-NeoX read a sequence at inference: consecutive windows of the full
context, each codon scored given the codons before it in its window, codons generated one by one."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from modelzoo.errors import ConfigError
from modelzoo.inference import generation
from modelzoo.inference_batching import Packed, Piece


class CausalReader:
    """The causal objective's side of ``GenomeLM``: its windows, scoring pieces and their results."""

    default_pooling = "surprise"  # which codons surprised the model, not the ones every genome shares

    def __init__(self, lm):
        self.lm = lm
        self.context = lm.config.max_position_embeddings  # codons per window

    def windows(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        """Consecutive windows of ``context`` codons, as training cut them."""
        for s in range(0, len(ids), self.context):
            yield ids[s: s + self.context]

    def check_pooling(self, pooling: str) -> None:
        if pooling == "cls":
            raise ConfigError(f"pooling 'cls' needs a BERT model; this is {self.lm.config.name} (use 'mean')")

    def pieces(self, ids: np.ndarray, score_unk: bool = False) -> Iterator[Piece]:
        """Windows overlapping by one codon, so that every codon but the first is scored; each
        placed at the codon index of its first scored codon (its second)."""
        stride = max(1, self.context - 1)
        return (Piece(ids[s: s + self.context], place=s + 1) for s in range(0, max(len(ids) - 1, 1), stride))

    def sums(self, packed: Packed, score_unk: bool) -> list[tuple[float, int]]:
        """Each piece's summed log-probability and scored codons."""
        logp, scored = self._log_probs(packed, score_unk)
        totals, counts = packed.per_piece(logp, scored), packed.per_piece(scored)
        return list(zip(totals.tolist(), counts.long().tolist()))

    def values(self, packed: Packed, score_unk: bool) -> list[np.ndarray]:
        """Each piece's log-probabilities of its codons after the first (NaN: not scored)."""
        logp, scored = self._log_probs(packed, score_unk)
        values = torch.where(scored, logp.double(), math.nan).numpy()
        return [values[start + 1: end] for start, end in packed.spans]

    @staticmethod
    def place(values: np.ndarray, piece: Piece, result: np.ndarray) -> None:
        """A piece's ``values`` into its sequence's per-codon array."""
        values[piece.place: piece.place + len(result)] = result

    def _log_probs(self, packed: Packed, score_unk: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token (flattened, on the CPU): its log-probability given the tokens before it in its
        piece, and whether it is scored (a codon, or [UNK] with ``score_unk``, not a piece's first)."""
        logits = self.lm.token_logits(packed)
        scored = torch.from_numpy(self.lm._scored(packed.input_ids.cpu().numpy(), score_unk).reshape(-1))
        return next_token_log_probs(packed, logits), scored & packed.follows()

    def generate(self, prompt: str, **sampling) -> list[str]:
        return generation.generate(self.lm, prompt, **sampling)


def next_token_log_probs(packed: Packed, logits: torch.Tensor) -> torch.Tensor:
    """Per flattened token of a packed batch (on the CPU, float32): the log-probability the
    logits of the token before it in its row give it (0 for a row's first token; whether that
    token is of the same piece is ``packed.follows()``)."""
    ids = packed.input_ids
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].cpu()
    return torch.cat((logp.new_zeros(len(logp), 1), logp), 1).reshape(-1)


def surprise_weights(packed: Packed, logits: torch.Tensor, codon: torch.Tensor) -> torch.Tensor:
    """Per token: its surprisal squared, (-log p(codon | earlier codons of its piece))^2, on
    the CPU; a piece's first codon (nothing predicts it) and non-codons get none. A small
    floor keeps a sequence the model predicts perfectly at its mean."""
    return next_token_log_probs(packed, logits).square() * packed.follows() * codon + 1e-6 * codon
