"""TensorBoard's embedding projector files for vectors already on disk, written a block of rows at
a time: the files ``SummaryWriter.add_embedding`` writes (the same bytes), without holding the
vectors in memory or formatting them one number at a time, so ``embed`` stays flat in memory
and fast for any number of records.

    log_dir/events.out.tfevents.*            (an empty run: what makes log_dir a TensorBoard run)
    log_dir/projector_config.pbtxt
    log_dir/00000/embeddings/tensors.tsv     one row of tab-separated numbers per vector
    log_dir/00000/embeddings/metadata.tsv    the rows of the metadata table
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TAG = "embeddings"
SUBDIR = f"00000/{TAG}"
CONFIG = (f'embeddings {{\n  tensor_name: "{TAG}:00000"\n  metadata_path: "{SUBDIR}/metadata.tsv"\n'
          f'  tensor_path: "{SUBDIR}/tensors.tsv"\n}}\n')
ROWS_PER_BLOCK = 4096


def write_projector(log_dir: Path, vectors: Path, table: Path) -> None:
    """The projector of the (n, d) float32 .npy ``vectors``, labelled by ``table`` (a TSV whose
    first line is its header, then one row per vector): a table of one column is written
    without its header, as ``add_embedding`` does with one metadata column."""
    from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import
    SummaryWriter(log_dir=str(log_dir)).close()
    out = log_dir / SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    rows = np.load(vectors, mmap_mode="r")
    with open(out / "tensors.tsv", "w") as f:
        for start in range(0, len(rows), ROWS_PER_BLOCK):
            block = np.asarray(rows[start: start + ROWS_PER_BLOCK]).tolist()
            f.writelines("\t".join(map(str, row)) + "\n" for row in block)
    with open(table) as source, open(out / "metadata.tsv", "w") as f:
        header = source.readline()
        if "\t" in header:
            f.write(header)
        for line in source:
            f.write(line)
    (log_dir / "projector_config.pbtxt").write_text(CONFIG)
