"""Sampling codon sequences from a causal model: codons only, temperature, top-k, top-p, a
seeded generator, a KV cache, and a window that slides once the context is full."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from modelzoo.errors import ConfigError
from modelzoo.models.layers import KVCache

STOP_CODONS = ("TAA", "TAG", "TGA")
MAX_GENERATED = 10 ** 6  # codons per sequence, and sequences: generate holds them all in memory


@torch.no_grad()
def generate(lm, prompt: str, max_codons: int, temperature: float, top_k: int | None, top_p: float | None,
             num_return_sequences: int, seed: int | None, stop_at_stop_codon: bool, batch_size: int,
             use_cache: bool, progress: bool) -> list[str]:
    """``GenomeLM.generate`` for a causal model ``lm``."""
    prompt_ids = _prompt_ids(lm, prompt)
    _check_sampling(max_codons, temperature, top_k, top_p, num_return_sequences, batch_size)
    generator = torch.Generator(device=lm.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    sampler = _Sampler(lm, generator, dict(temperature=temperature, top_k=top_k, top_p=top_p))
    out = []
    bar = tqdm(total=num_return_sequences * max_codons, desc="generate", unit=" codons",
               disable=None if progress else True)
    with bar:
        for first in range(0, num_return_sequences, batch_size):
            rows = min(batch_size, num_return_sequences - first)
            tokens, lengths = sampler.rows(prompt_ids, rows, max_codons, use_cache, stop_at_stop_codon, bar)
            out += [lm.tokenizer.decode(t[:n]) for t, n in zip(tokens.cpu().numpy(), lengths)]
    return out


class _Sampler:
    def __init__(self, lm, generator: torch.Generator, sampling: dict):
        self.lm, self.generator, self.sampling = lm, generator, sampling
        self.codon_ids = torch.as_tensor(lm.tokenizer.codon_ids.astype(np.int64), device=lm.device)
        self.stop_ids = torch.as_tensor([int(lm.tokenizer.encode(c)[0]) for c in STOP_CODONS], device=lm.device)

    def rows(self, prompt_ids, rows, max_codons, use_cache, stop_at_stop, bar):
        """``rows`` sequences of up to ``max_codons`` codons after the prompt: (tokens, each one's length)."""
        model = self.lm.model
        tokens = prompt_ids.repeat(rows, 1)
        lengths = [len(prompt_ids) + max_codons] * rows
        stopped = torch.zeros(rows, dtype=torch.bool, device=self.lm.device)
        start, cache = 0, None
        for step in range(max_codons):
            window_start = _slide(start, tokens.shape[1], self.lm.config.max_position_embeddings)
            if not use_cache:
                logits = model({"input_ids": tokens[:, window_start:]})["logits"]
            else:
                if cache is None or window_start != start:  # (re)fill the cache with the whole window
                    cache, feed = KVCache(), tokens[:, window_start:]
                else:
                    feed = tokens[:, -1:]
                logits = model({"input_ids": feed, "cache": cache})["logits"]
            start = window_start
            codon = self.sample(logits[:, -1].float(), **self.sampling)
            tokens = torch.cat((tokens, codon[:, None]), dim=1)
            bar.update(rows)
            if stop_at_stop:
                ends = torch.isin(codon, self.stop_ids) & ~stopped
                for r in ends.nonzero().flatten().tolist():
                    lengths[r] = tokens.shape[1]
                stopped |= ends
                if stopped.all():
                    bar.update(rows * (max_codons - step - 1))
                    break
        return tokens, lengths

    def sample(self, logits, temperature, top_k, top_p) -> torch.Tensor:
        """Next codon per row; every non-codon token gets probability zero."""
        only_codons = torch.full_like(logits, -math.inf)
        only_codons[:, self.codon_ids] = 0.0
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
        return torch.multinomial(logits.softmax(-1), 1, generator=self.generator)[:, 0]


def _prompt_ids(lm, prompt: str) -> torch.Tensor:
    text = "".join(prompt.split())
    ids = lm.tokenizer.encode(text)
    if not text or len(text) % 3 or not np.isin(ids, lm.tokenizer.codon_ids).all():
        raise ConfigError(f"prompt {prompt[:30]!r}: need one or more whole codons of A/C/G/T (e.g. 'ATG')")
    return torch.as_tensor(ids.astype(np.int64), device=lm.device)


def _slide(start: int, length: int, context: int) -> int:
    """First token of the window the next codon is predicted from: unchanged while the tokens
    fit the context, else jump so that the newest half of the context is kept."""
    return start if length - start <= context else length - max(1, context // 2)


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
