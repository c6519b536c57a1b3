"""The CSX backend: emulated Cerebras weight streaming (MemoryX, wafer, SwarmX)."""

from modelzoo.backends.csx.backend import CSXBackend

__all__ = ["CSXBackend", "csx_backend"]


def csx_backend(params) -> CSXBackend:
    """The CSX backend of this rank; joins the launcher's process group when --num_csx > 1."""
    from modelzoo.distributed import init_process_group
    init_process_group("cpu")
    return CSXBackend(params)
