"""Layers shared by GPT-2, GPT-J, GPT-NeoX and BERT."""

from __future__ import annotations

import contextlib
import time
import weakref
from typing import Literal, Optional, Union

import torch
from torch import nn
import torch.nn.functional as F


class Rotary(nn.Module):
    """Rotary position embedding on the first ``rotary_dim`` dimensions of each head.

    Dimension pairs turn by the angle position * base^(-2i/d). GPT-J pairs interleaved dims
    (2i, 2i+1); GPT-NeoX (``interleaved=False``) pairs dim i with dim i + d/2 ("rotate half").
    The angles are recomputed per call (a (t, d/2) table, negligible next to attention) so the
    module holds no state to checkpoint.

    A pair (a, b) turns to (a cos - b sin, b cos + a sin). That is computed as
    x * cos + partner(x) * sin, with cos and sin laid out as the dims they turn and sin negated
    where the partner is subtracted: the same products and sums, so the same bits, in four
    element-wise ops over the rotated dims alone. Attention turns q and k together, in place in
    its fused q/k/v projection (``turn_qk_``): the rest of each head is neither read nor copied.
    """

    def __init__(self, rotary_dim: int, base: float = 10000.0, interleaved: bool = True):
        super().__init__()
        if rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        self.base = base
        self.interleaved = interleaved

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every position's angles: positions (...) -> (..., rotary_dim / 2)."""
        exponents = torch.arange(0, self.rotary_dim, 2, device=positions.device, dtype=torch.int64) / self.rotary_dim
        inv_freq = 1.0 / (self.base ** exponents)
        theta = positions.to(torch.float32)[..., None] * inv_freq
        return theta.cos(), theta.sin()

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin per rotated dim, in ``dtype``: positions (...) -> (..., rotary_dim)."""
        cos, sin = (z.to(dtype) for z in self.angles(positions))
        if self.interleaved:
            return cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)
        return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)

    def partner(self, x: torch.Tensor) -> torch.Tensor:
        """The dim each rotated dim pairs with, at its place: (x1, x0, x3, x2, ...) interleaved,
        else (second half, first half)."""
        if self.interleaved:
            return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        half = self.rotary_dim // 2
        return torch.cat((x[..., half:], x[..., :half]), -1)

    def turned(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x's first rotary_dim dims turned (the rest left out); cos, sin from ``tables``."""
        x = x[..., : self.rotary_dim]
        return x * cos + self.partner(x) * sin

    @staticmethod
    def _positions(t: int, offset: int, positions: Optional[torch.Tensor], device) -> torch.Tensor:
        return torch.arange(offset, offset + t, device=device) if positions is None else positions

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0,
                positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: (batch, heads, t, head_dim) -> the same with positions rotated in: each row's
        ``positions`` (batch, t) when given (packed windows restart them per record), else
        offset, offset + 1, ..."""
        at = self._positions(q.shape[-2], offset, positions, q.device)
        cos, sin = self.tables(at if positions is None else at[:, None, :], q.dtype)  # shared by the heads
        return tuple(torch.cat((self.turned(x, cos, sin), x[..., self.rotary_dim:]), dim=-1) for x in (q, k))

    def turn_qk_(self, qkv: torch.Tensor, offset: int = 0, positions: Optional[torch.Tensor] = None) -> None:
        """Rotate q and k in place in a fused projection qkv (batch, t, 3, heads, head_dim) whose
        [:, :, 0] is q and [:, :, 1] k; positions as ``forward``'s. (In place is safe for autograd:
        no op before it saved the projection's output, and the turn itself saves only the tables.)"""
        at = self._positions(qkv.shape[1], offset, positions, qkv.device)
        cos, sin = (z[..., None, None, :] for z in self.tables(at, qkv.dtype))  # shared by q, k and heads
        qk = qkv[:, :, :2]
        qk[..., : self.rotary_dim] = self.turned(qk, cos, sin)


class KVCache:
    """Keys and values of the tokens seen so far, per attention layer, for incremental decoding.

    Inference puts one in the batch (``batch["cache"]``) and feeds only the new tokens: each
    causal Attention appends their keys and values and attends over all cached ones, and position
    embeddings start at ``offset``. Training never passes one, so the stages stay the same.
    """

    def __init__(self):
        self._kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def length(self, layer: nn.Module) -> int:
        return self._kv[layer][0].shape[-2] if layer in self._kv else 0

    @property
    def offset(self) -> int:
        """Position of the next token (tokens cached by every layer that has run)."""
        return min((k.shape[-2] for k, _ in self._kv.values()), default=0)

    def extend(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys/values (batch, heads, t, head_dim); return past + new."""
        if layer in self._kv:
            past_k, past_v = self._kv[layer]
            k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
        self._kv[layer] = (k, v)
        return k, v


def position_offset(batch: dict) -> int:
    """Position of the batch's first token: 0, or the tokens already in its KV cache."""
    cache = batch.get("cache")
    return 0 if cache is None else cache.offset


# dtype -> how many times its fp32 rate this CPU multiplies matrices at in that dtype: this
# process's measurement, filled by cpu_matmul_speedup alone (a run's ranks agree on their mean in
# backends/precision.py, which hands the model booleans)
cpu_matmul_speedups: dict[torch.dtype, float] = {}


def cpu_matmul_speedup(dtype: torch.dtype) -> float:
    """How many times its fp32 rate this CPU multiplies matrices at in ``dtype`` (bf16 or fp16),
    measured once per process: the best of three 1024^3 products in each, alternating (about
    0.1 s). AMX tiles do not decide it: an Intel Xeon with AVX-512 BF16 but no AMX multiplied in
    bf16 at about half its fp32 rate, an AMD EPYC (Zen 4, AVX-512 BF16, no AMX) at about 2.2 times it
    (bench/results/throughput.md, whole_path.md)."""
    if dtype not in cpu_matmul_speedups:
        cpu_matmul_speedups[dtype] = _measure_matmul_speedup(dtype)
    return cpu_matmul_speedups[dtype]


def _measure_matmul_speedup(dtype: torch.dtype) -> float:
    from torch.utils._python_dispatch import _disable_current_modes
    # real CPU tensors, in fp32 and dtype as asked, whatever the caller runs under (a memory plan's
    # fake tensors, the meta device, autocast), drawn from their own generator (the run's random
    # streams stay where they were)
    with _disable_current_modes(), torch.no_grad(), torch.autocast("cpu", enabled=False):
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.rand(1024, 1024, generator=generator, device="cpu") for _ in range(2))
        operands = {torch.float32: (a, b), dtype: (a.to(dtype), b.to(dtype))}
        best = dict.fromkeys(operands, float("inf"))
        for trial in range(4):  # the first round warms the kernels up
            for kind, (x, y) in operands.items():
                start = time.perf_counter()
                torch.mm(x, y)
                if trial:
                    best[kind] = min(best[kind], time.perf_counter() - start)
    return best[torch.float32] / best[dtype]


def attention_in_fp32(setting: Union[bool, Literal["auto"]], device: torch.device, dtype: torch.dtype) -> bool:
    """Whether attention on q/k/v of ``dtype`` on ``device`` computes in fp32 (model.attention_in_fp32).

    "auto" picks fp32 on CPUs that multiply matrices no faster in ``dtype`` than in fp32
    (``cpu_matmul_speedup``): there the bf16/fp16 flash-attention kernels, built on those
    matmuls, are slower too, so fp32 attention is both faster and more accurate. Elsewhere (AMX
    CPUs, AMD Zen 4, GPUs) it keeps the low-precision dtype. A run hands its models a boolean
    (backends/precision.py decides 'auto' before building them); 'auto' reaches here from models
    built by hand.
    """
    if dtype == torch.float32 or setting is False:
        return False
    if setting is True:
        return True
    return device.type == "cpu" and cpu_matmul_speedup(dtype) <= 1.0


def token_positions(batch: dict, length: int, device) -> torch.Tensor:
    """Each token's position: the batch's ``position_ids`` (packed windows restart them at every
    record), else offset, offset + 1, ... (offset > 0 when decoding with a KV cache)."""
    if batch.get("position_ids") is not None and batch.get("cache") is None:
        return batch["position_ids"]
    start = position_offset(batch)
    return torch.arange(start, start + length, device=device)


def document_runs(documents: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of ``documents`` (batch, t), the [start, end) of every run of one document id;
    runs of a negative id (padding: no document) are left out. One host sync for the batch."""
    b, t = documents.shape
    new = torch.ones_like(documents, dtype=torch.bool)
    new[:, 1:] = documents[:, 1:] != documents[:, :-1]
    rows, starts = new.nonzero(as_tuple=True)
    ids = documents[rows, starts]
    rows, starts, ids = rows.tolist(), starts.tolist(), ids.tolist()
    runs: list[list[tuple[int, int]]] = [[] for _ in range(b)]
    for i, (row, begin, doc) in enumerate(zip(rows, starts, ids)):
        end = starts[i + 1] if i + 1 < len(rows) and rows[i + 1] == row else t
        if doc >= 0:
            runs[row].append((begin, end))
    return runs


class _BatchRuns:
    """``document_runs`` of the batch the layers are running: every attention layer of one forward
    (and every stage the CSX wafer runs) reads the same ``document_ids`` tensor, so its runs are
    read from the device once per batch, not once per layer (a host sync each on a GPU)."""

    def __init__(self):
        self._key, self._runs = None, None

    def __call__(self, documents: torch.Tensor) -> list[list[tuple[int, int]]]:
        key = (weakref.ref(documents), documents._version)
        if self._key is None or self._key[0]() is not documents or self._key[1] != key[1]:
            self._key, self._runs = key, document_runs(documents)
        return self._runs


batch_runs = _BatchRuns()


def document_mask(documents: torch.Tensor, causal: bool) -> torch.Tensor:
    """The (batch, 1, t, t) boolean mask of document attention: a token sees the (earlier, when
    causal) tokens of its own document; a token in no document (id < 0) sees only itself, so no
    row of the softmax is empty. t x t per row: the fallback kernel, for short windows."""
    t = documents.shape[1]
    allowed = (documents[:, None, :, None] == documents[:, None, None, :]) & (documents >= 0)[:, None, None, :]
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool, device=documents.device).tril()
    return allowed | torch.eye(t, dtype=torch.bool, device=documents.device)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: list[list[tuple[int, int]]],
                      causal: bool, dropout_p: float) -> torch.Tensor:
    """Document attention as one fused SDPA per document: q, k, v (batch, heads, t, head_dim),
    ``runs`` from ``document_runs``. Work and memory grow with each document's own length
    (sum of n^2, no t x t mask); tokens in no document get a zero output.

    Rows and documents are cut with unbind and split (whose backward is one stack / cat), not
    by indexing: an indexed slice's backward writes a zero-filled gradient of the whole tensor
    per document, which cost more than the attention itself (bench/bench_packing.py).
    """
    t = q.shape[2]
    rows = []
    for qr, kr, vr, spans in zip(q.unbind(0), k.unbind(0), v.unbind(0), runs):
        sizes, inside, at = [], [], 0
        for begin, end in spans:
            if begin > at:
                sizes.append(begin - at)
                inside.append(False)
            sizes.append(end - begin)
            inside.append(True)
            at = end
        if at < t:
            sizes.append(t - at)
            inside.append(False)
        pieces = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=causal,
                                                 dropout_p=dropout_p)[0] if keep else qs.new_zeros(qs.shape)
                  for qs, ks, vs, keep in zip(qr.split(sizes, 1), kr.split(sizes, 1), vr.split(sizes, 1), inside)]
        rows.append(torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0])
    return torch.stack(rows)


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention (flash / memory-efficient
    kernels, so memory grows linearly with sequence length).

    What it attends to comes from the batch: a KV cache (incremental decoding), ``document_ids``
    (packed windows: each token attends only to its own record, see ``document_kernel``),
    ``position_ids`` (rotary angles), and for bidirectional attention ``attention_mask`` (keys
    that are [PAD] get no attention; causal attention needs none, as [PAD] follows every codon).
    """

    # "segments": one fused SDPA per document (exact, memory linear in the length: the default);
    # "mask": one SDPA with a t x t boolean document mask per row (the simple fallback).
    # bench/bench_packing.py measures both.
    document_kernel: Literal["segments", "mask"] = "segments"

    def __init__(self, hidden_size: int, num_heads: int, *, bias: bool, dropout: float,
                 attention_dropout: float, causal: bool,
                 rotary: Optional[Rotary] = None,
                 out_bias: Optional[bool] = None, in_fp32: Union[bool, Literal["auto"]] = False):
        super().__init__()
        self.num_heads = num_heads
        self.in_fp32 = in_fp32  # True, False or "auto": see attention_in_fp32()
        self.causal = causal
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.out = nn.Linear(hidden_size, hidden_size, bias=bias if out_bias is None else out_bias)
        self.dropout = nn.Dropout(dropout)
        self.rotary = rotary

    @classmethod
    def from_config(cls, cfg, *, bias: bool, causal: bool, rotary=None) -> "Attention":
        """The attention block of a model config: sizes, dropout and precision come from cfg."""
        return cls(cfg.hidden_size, cfg.num_heads, bias=bias, dropout=cfg.dropout_rate,
                   attention_dropout=cfg.attention_dropout_rate, causal=causal, rotary=rotary,
                   in_fp32=cfg.attention_in_fp32)

    def forward(self, x: torch.Tensor, batch: Optional[dict] = None) -> torch.Tensor:
        batch = batch or {}
        cache: Optional[KVCache] = batch.get("cache")
        documents = batch.get("document_ids") if cache is None else None
        b, t, c = x.shape
        qkv = self.qkv(x)
        dtype = qkv.dtype  # the projections' (autocast) dtype, which the output returns to
        in_fp32 = attention_in_fp32(self.in_fp32, qkv.device, dtype)
        if in_fp32:  # one cast of q, k and v together, before rotary, so positions rotate in fp32 too
            qkv = qkv.float()
        qkv = qkv.view(b, t, 3, self.num_heads, c // self.num_heads)
        past = 0 if cache is None else cache.length(self)
        if self.rotary is not None:
            self.rotary.turn_qk_(qkv, offset=past, positions=batch.get("position_ids") if cache is None else None)
        q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))  # (b, heads, t, head_dim)
        if cache is not None:
            k, v = cache.extend(self, k, v)
        mask = None
        padding_mask = None if self.causal or documents is not None else batch.get("attention_mask")
        if past:  # incremental decoding (no padding): the t queries are the last of past + t keys
            if t > 1:
                mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        elif documents is not None and self.document_kernel == "mask":
            mask = document_mask(documents, self.causal)
        elif padding_mask is not None and not padding_mask.all():  # keys that are padding get no attention
            # (no mask at all when nothing is padded: the fused flash kernels take no mask)
            mask = padding_mask[:, None, None, :].bool()
        is_causal = self.causal and mask is None and not past
        dropout_p = self.attention_dropout if self.training else 0.0
        # autocast would cast fp32 q/k/v back down to the low-precision dtype
        with torch.autocast(x.device.type, enabled=False) if in_fp32 else contextlib.nullcontext():
            if documents is not None and mask is None:
                y = segment_attention(q, k, v, batch_runs(documents), self.causal, dropout_p)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
        # heads back next to each other, in the projections' dtype: one copy for both (a cast
        # lays the copy out contiguously, so the reshape is then a view)
        y = y.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format).reshape(b, t, c)
        return self.dropout(self.out(y))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_size: int, *, dropout: float, approximate_gelu: bool):
        super().__init__()
        self.fc_in = nn.Linear(hidden_size, ffn_size)
        self.fc_out = nn.Linear(ffn_size, hidden_size)
        self.approximate = "tanh" if approximate_gelu else "none"
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate)))
