"""Codon-level genome language models (GenSLM-style) in the shape of the Cerebras Model Zoo.

``from modelzoo import GenomeLM`` loads a trained model for embeddings, generation and scoring
(see modelzoo/inference/). It is imported on first use, so ``import modelzoo`` stays light.
"""

__all__ = ["GenomeLM"]


def __getattr__(name: str):
    if name == "GenomeLM":
        from modelzoo.inference import GenomeLM
        return GenomeLM
    raise AttributeError(f"module 'modelzoo' has no attribute {name!r}")
