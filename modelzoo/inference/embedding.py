"""Pooling a model's activations into one vector per sequence (``GenomeLM.embed``): which layer,
which positions, weighted how."""

from __future__ import annotations

from typing import Iterable, Iterator, Union

import numpy as np
import torch

from modelzoo.errors import ConfigError, DataError
from modelzoo.inference.causal import surprise_weights
from modelzoo.inference_batching import Packed, Piece

POOLINGS = ("surprise", "mean", "cls", "genslm")
SURPRISE_LAYER = 0  # the layer surprise pooling reads by default: which codons surprised the model
Layer = Union[int, str]  # a boundary activation's index, or "final"


def one_layer(layer) -> bool:
    """Whether embed's ``layer`` names one layer (an index or "final") rather than a list."""
    return isinstance(layer, (int, np.integer, str))


def default_layer(pooling: str) -> Layer:
    """The layer ``embed`` pools by default: the codon embeddings for surprise pooling (which
    codons surprised the model), the final norm's output for GenSLM's recipe, else the last block."""
    return {"surprise": SURPRISE_LAYER, "genslm": "final"}.get(pooling, -1)


def check_pooling(lm, pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    lm.reader.check_pooling(pooling)
    if pooling == "surprise":
        lm._need_token_head("pooling 'surprise'")


def state_index(num_hidden_layers: int, layer: Layer) -> int:
    """0..num_hidden_layers for a boundary activation, num_hidden_layers + 1 for "final"."""
    num_states = num_hidden_layers + 1
    if layer == "final":
        return num_states
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and -num_states <= layer < num_states:
        return int(layer) % num_states
    raise ConfigError(f"layer {layer!r}: this model has layers 0..{num_states - 1} (or -1..-{num_states}) "
                      f"and 'final'")


def reading(lm, pooling: str):
    """(encoded, pieces_of) for ``streams.streamed``: GenSLM's recipe reads its own tokens, one
    window; every other pooling the model's windows."""
    if pooling == "genslm":
        return lambda sequences: _encoded_as_genslm(lm, sequences), lambda ids: [Piece(ids)]
    return None, lambda ids: map(Piece, lm.reader.windows(ids))


def pooled(lm, packed: Packed, wanted: list[int], pooling: str, bf16: bool) -> list:
    """Each piece's pooled layers, weighted (float64 sums, layers x hidden) and its total weight."""
    blocks_out = lm.config.num_hidden_layers  # the state index of the last block's output
    final = blocks_out + 1  # layer "final"'s index: where the head's output would be
    kept = {blocks_out if k == final else k for k in wanted}
    needed = len(lm.model.stages()) if pooling == "surprise" else max(kept) + 1
    with lm._autocast(bf16):
        states = _states(lm.model, packed.batch, needed, kept)
        if final in wanted:
            states[final] = _final_norm(lm.model, states[blocks_out])
    codon = torch.from_numpy(lm._scored(packed.input_ids.cpu().numpy(), False).reshape(-1)).float()
    if pooling == "cls":
        weights = torch.zeros_like(codon)
        weights[packed.starts()] = 1
    elif pooling == "surprise":
        weights = surprise_weights(packed, states["logits"], codon)
    elif pooling == "genslm":  # GenSLM averages every position its attention mask keeps
        weights = (packed.piece_of >= 0).float()
    else:
        weights = codon
    width = lm.config.hidden_size
    vectors = torch.stack([packed.per_piece(states[k].float().reshape(-1, width).cpu(), weights) for k in wanted], 1)
    return list(zip(vectors, packed.per_piece(weights)))


def means(per_sequence, layer) -> np.ndarray:
    """A round's vectors: each sequence's weighted sums over its pieces, divided by its weight."""
    out = []
    for _, found in per_sequence:
        sums, counts = found[0][1]
        for _, (s, c) in found[1:]:
            sums, counts = sums + s, counts + c
        out.append((sums / counts).float().numpy())  # (layers, hidden)
    vectors = np.stack(out)
    return vectors[:, 0] if one_layer(layer) else vectors.transpose(1, 0, 2)


def _states(model, batch: dict, n_stages: int, kept: set[int]) -> dict:
    """The activations after those of the first ``n_stages`` stages named in ``kept`` (0: the
    token embeddings), and the head's "logits" when every stage runs."""
    hidden, states = None, {}
    for k, stage in enumerate(model.stages()[:n_stages]):
        hidden = stage(hidden, batch)
        if k in kept:
            states[k] = hidden
    if n_stages == len(model.stages()):
        states["logits"] = hidden["logits"]
    return states


def _final_norm(model, last_block: torch.Tensor) -> torch.Tensor:
    """The final norm's output: the head's ``ln_f`` (every GPT's); a model without one (BERT
    normalises at the end of each block) gives its last block's output."""
    norm = getattr(model.stages()[-1], "ln_f", None)
    return last_block if norm is None else norm(last_block)


def _encoded_as_genslm(lm, sequences: Iterable) -> Iterator[tuple[object, np.ndarray]]:
    """Each sequence with GenSLM's ids of it, cut to the model's first max_position_embeddings."""
    for k, item in enumerate(sequences):
        name, seq = (item.id, item.seq) if hasattr(item, "seq") else (f"#{k}", item)
        ids = lm.tokenizer.encode(seq, genslm=True)[: lm.config.max_position_embeddings].astype(np.int64)
        if not len(ids):
            raise DataError(f"sequence {name}: empty (GenSLM's recipe has no token to average)")
        yield item, ids
