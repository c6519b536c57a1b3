"""The CSX backend: emulated Cerebras weight streaming (MemoryX, wafer, SwarmX)."""

from modelzoo.backends.csx.backend import CSXBackend

__all__ = ["CSXBackend"]
