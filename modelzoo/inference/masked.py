"""How BERT reads a sequence at inference: windows framed [CLS] ... [SEP] as in training
(``modelzoo.data.datasets.frame``), each codon scored masked, from both sides (the
pseudo-log-likelihood); a masked model generates nothing."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from modelzoo.data.datasets import frame, frame_body
from modelzoo.errors import ConfigError
from modelzoo.inference_batching import Packed, Piece
from modelzoo.models import MODELS


class MaskedReader:
    """The masked objective's side of ``GenomeLM`` (a BERT classifier's windows too): its
    windows, scoring pieces and their results."""

    default_pooling = "mean"

    def __init__(self, lm):
        self.lm = lm
        self.context = frame_body(lm.config.max_position_embeddings)  # codons per window

    def windows(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        """Consecutive pieces of ``context`` codons, each framed [CLS] ... [SEP], as training cut them."""
        tok = self.lm.tokenizer
        for s in range(0, len(ids), self.context):
            yield frame(ids[s: s + self.context], tok.cls_id, tok.sep_id)

    def check_pooling(self, pooling: str) -> None:
        if pooling in ("surprise", "genslm"):
            raise ConfigError(f"pooling {pooling!r} needs a GPT model; this is {self.lm.config.name} "
                              f"(use 'mean' or 'cls')")

    def pieces(self, ids: np.ndarray, score_unk: bool = False) -> Iterator[Piece]:
        """One piece per (window, scored codon): the framed window with that codon masked, placed
        at the codon's index in the sequence."""
        for k, w in enumerate(self.windows(ids)):
            for p in np.flatnonzero(self.lm._scored(w, score_unk)):
                yield Piece(w, place=k * self.context + int(p) - 1, mask_at=int(p))  # p counts [CLS]

    def sums(self, packed: Packed, score_unk: bool = False) -> list[tuple[float, int]]:
        """Log-probability of each piece's masked codon, from both sides (and 1 codon scored);
        which codons are scored (``score_unk``) the pieces decided."""
        logits = self.lm.token_logits(packed)
        at = torch.tensor(packed.masked, device=self.lm.device)
        targets = torch.tensor(packed.targets, device=self.lm.device)
        logp = logits.reshape(-1, logits.shape[-1])[at].float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        return [(value, 1) for value in logp.double().cpu().tolist()]

    values = sums  # one masked codon per piece: its value is its sum

    @staticmethod
    def place(values: np.ndarray, piece: Piece, result: tuple[float, int]) -> None:
        """A piece's masked codon's value into its sequence's per-codon array."""
        values[piece.place] = result[0]

    def generate(self, prompt: str, **sampling) -> list[str]:
        causal = ", ".join(name for name, spec in MODELS.items() if spec.generates)
        raise ConfigError(f"{self.lm.source}: generate needs a causal model ({causal}); this checkpoint is "
                          f"{self.lm.config.name}")
