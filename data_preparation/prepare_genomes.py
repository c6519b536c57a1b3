"""Genomes (FASTA/GenBank, plain or .gz) -> train/val/test codon token shards.

    python -m data_preparation.prepare_genomes --input a.fasta.gz b.gb --output_dir data/ \\
        --max_seq_length 2048 --split 0.9,0.05,0.05 --seed 0

Records are split (not windows), so a genome never straddles train and test. A genome longer
than max_seq_length codons becomes consecutive non-overlapping windows; the last is padded with
[PAD], or dropped when shorter than --min_codons. The output is deterministic: same inputs and
options give byte-identical shards. DIR appears complete or not at all; --overwrite replaces
an earlier output of this tool only, never a directory holding anything else (or an input).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from modelzoo.data.sequences import read_record_batches
from modelzoo.data.shards import ShardWriter, file_sha256, shard_files
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.entry import OneLineParser, run_entry
from modelzoo.errors import DataError, UserError
from modelzoo.files import output_dir

SPLITS = ("train", "val", "test")
WINDOW_GROUP_CODONS = 1 << 24  # codons cut into windows per allocation
COMMAND = "python -m data_preparation.prepare_genomes"
TOOL = "data_preparation.prepare_genomes"  # the owner named in its output's modelzoo.files.OWNER_MARKER


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="FASTA/GenBank files, plain or .gz")
    p.add_argument("--output_dir", required=True, help="gets train/, val/, test/ shard dirs")
    p.add_argument("--max_seq_length", type=int, required=True, help="codons per window")
    p.add_argument("--split", default="0.9,0.05,0.05", help="train,val,test record fractions")
    p.add_argument("--seed", type=int, default=0, help="seed of the record split permutation")
    p.add_argument("--features", default=None, help="GenBank feature type to extract, e.g. CDS")
    p.add_argument("--max_n_fraction", type=float, default=0.5,
                   help="skip records whose fraction of [UNK] codons is above this")
    p.add_argument("--min_codons", type=int, default=8,
                   help="skip shorter records; drop a trailing window shorter than this")
    p.add_argument("--rename_duplicate_ids", action="store_true",
                   help="suffix repeated record ids with #2, #3... instead of failing")
    p.add_argument("--windows_per_file", type=int, default=1 << 16)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of this tool (never a directory holding other files)")
    return p.parse_args(argv)


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        fracs = tuple(float(x) for x in text.split(","))
    except ValueError:
        fracs = ()
    if len(fracs) != 3 or min(fracs) < 0 or abs(sum(fracs) - 1.0) > 1e-6:
        raise UserError(f"--split {text!r}: need three non-negative fractions summing to 1, e.g. 0.9,0.05,0.05")
    return fracs


def earlier_output(out_dir: Path) -> set[str] | None:
    """What prepare_genomes wrote into ``out_dir`` before its outputs carried an owner marker
    (``modelzoo.files.OWNER_MARKER``): split directories of its shards, each listing its files
    in its manifest; None when there is none."""
    owned = set()
    for name in SPLITS:
        files = shard_files(out_dir / name, command=COMMAND)
        owned |= {f"{name}/{f}" for f in files or ()}
    return owned or None


def windows_of(ids: np.ndarray, max_seq_length: int, min_codons: int, pad_id: int) -> np.ndarray:
    """Cut codon ids into non-overlapping [PAD]-padded rows; drop a short trailing window."""
    return windows_of_many([ids], max_seq_length, min_codons, pad_id)[0]


def windows_of_many(id_lists: list[np.ndarray], max_seq_length: int, min_codons: int,
                    pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``windows_of`` of each sequence, back to back in one [PAD]-filled array, and the number of
    windows of each (one allocation for all records: most bacterial genes fit in one window)."""
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    counts = -(-lengths // max_seq_length)
    tail = lengths - (counts - 1) * max_seq_length
    counts -= (counts > 1) & (tail < min_codons)
    used = np.minimum(lengths, counts * max_seq_length)
    out = np.full((int(counts.sum()), max_seq_length), pad_id, dtype=np.uint8)
    flat = out.reshape(-1)
    starts = (np.cumsum(counts) - counts) * max_seq_length
    for ids, start, n_used in zip(id_lists, starts.tolist(), used.tolist()):
        flat[start:start + n_used] = ids[:n_used]
    return out, counts


def split_bounds(n: int, fracs) -> list[int]:
    cuts = [round(c * n) for c in np.cumsum(fracs)]
    return [0] + cuts[:-1] + [n]


def tokenize_inputs(args, tokenizer: CodonTokenizer):
    """Read every record; return kept (id, codon ids) in input order and skip counts by reason.

    Records come in batches of consecutive records (``read_record_batches``) and are tokenised
    and filtered a batch at a time in vectorised passes: per-record Python work would cost more
    than the tokenising itself on sets of many short genes.
    """
    kept, skipped, seen = [], Counter(), {}
    progress = tqdm(desc="reading", unit=" records", file=sys.stderr, disable=None, delay=2.0)
    try:
        for path in args.input:
            for batch in read_record_batches(path, features=args.features, allow_empty=True,
                                             rename_duplicates=args.rename_duplicate_ids):
                clash = seen.keys() & batch.ids
                if clash:
                    rec_id = next(i for i in batch.ids if i in clash)
                    raise DataError(f"{path}: record id {rec_id!r} already used in {seen[rec_id]}")
                seen.update(dict.fromkeys(batch.ids, path))
                ids, starts, counts = tokenizer.encode_flat(batch.seqs)
                unknown = _unk_counts(ids, starts, counts, tokenizer.unk_id)
                reasons = {
                    "empty (no whole codon)": counts == 0,
                    f"too short (< {args.min_codons} codons)": (counts > 0) & (counts < args.min_codons),
                    f"too many [UNK] codons (> {args.max_n_fraction:g})":
                        (counts >= args.min_codons) & (unknown / np.maximum(counts, 1) > args.max_n_fraction),
                }
                rejected = np.zeros(len(counts), dtype=bool)
                for reason, mask in reasons.items():
                    if mask.any():
                        skipped[reason] += int(mask.sum())
                        rejected |= mask
                good = np.flatnonzero(~rejected).tolist()
                kept.extend((batch.ids[i], ids[a:a + n])
                            for i, a, n in zip(good, starts[good].tolist(), counts[good].tolist()))
                progress.update(len(batch.ids))
    finally:
        progress.close()
    return kept, skipped, len(seen)


def _groups_of_codons(members: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    """``members`` (record indices) cut into consecutive runs of about WINDOW_GROUP_CODONS codons
    (``lengths[k]`` is record k's): windows are cut a run at a time, so memory stays bounded
    however large the input."""
    run = np.cumsum(lengths[members]) // WINDOW_GROUP_CODONS
    cuts = np.flatnonzero(np.diff(run)) + 1
    return [group.tolist() for group in np.split(members, cuts)] if len(members) else []


def _unk_counts(ids: np.ndarray, starts: np.ndarray, counts: np.ndarray, unk_id: int) -> np.ndarray:
    """[UNK] codons of each sequence ``ids[starts[i]:starts[i] + counts[i]]``: [UNK]s are rare,
    so find where they are and count them per sequence (a running sum over every codon costs 10x
    more). An [UNK] between sequences (a completed partial codon) counts for none."""
    where = np.flatnonzero(ids == unk_id)
    owner = np.searchsorted(starts, where, side="right") - 1
    inside = where < (starts + counts)[owner]
    return np.bincount(owner[inside], minlength=len(counts))


def prepare(args) -> dict:
    fracs = parse_split(args.split)
    if args.max_seq_length < 1 or args.min_codons < 1:
        raise UserError("--max_seq_length and --min_codons must be positive")
    with output_dir(args.output_dir, TOOL, args.overwrite, inputs=args.input, recognise=earlier_output) as tmp:
        return _prepare_into(tmp, args, fracs)


def _prepare_into(tmp_root: Path, args, fracs) -> dict:
    tokenizer = CodonTokenizer()
    kept, skipped, n_read = tokenize_inputs(args, tokenizer)
    if not kept:  # e.g. only all-N genomes: refuse rather than publish empty shards
        why = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items())) or "the input is empty"
        raise DataError(f"{', '.join(map(str, args.input))}: no usable record among {n_read} read ({why})")

    order = np.random.default_rng(args.seed).permutation(len(kept))
    lengths = np.fromiter((len(ids) for _, ids in kept), dtype=np.int64, count=len(kept))
    bounds = split_bounds(len(kept), fracs)
    options = {  # no output_dir or absolute paths: the manifest must not depend on where it ran
        "inputs": [{"name": Path(p).name, "sha256": file_sha256(Path(p))} for p in args.input],
        "max_seq_length": args.max_seq_length, "split": list(fracs), "seed": args.seed,
        "features": args.features, "max_n_fraction": args.max_n_fraction,
        "min_codons": args.min_codons, "rename_duplicate_ids": args.rename_duplicate_ids,
    }
    report = {"records_read": n_read, "records_kept": len(kept), "skipped": dict(skipped), "splits": {}}

    for name, frac, lo, hi in zip(SPLITS, fracs, bounds[:-1], bounds[1:]):
        if frac == 0:
            continue
        # Sorted: within a split, shard order follows input order (the sampler shuffles).
        members = np.sort(order[lo:hi])
        with ShardWriter(tmp_root / name, args.max_seq_length, tokenizer,
                         windows_per_file=args.windows_per_file, command=COMMAND,
                         options=dict(options, split_name=name)) as writer:
            for group in _groups_of_codons(members, lengths):
                rows, counts = windows_of_many([kept[k][1] for k in group], args.max_seq_length,
                                               args.min_codons, tokenizer.pad_id)
                writer.add_many([kept[k][0] for k in group], counts, rows)
        m = writer.manifest
        report["splits"][name] = {"records": len(members), "windows": m["num_windows"],
                                  "tokens": m["num_tokens"]}
    return report


def report_text(report: dict, out_dir: str) -> str:
    lines = [f"records read: {report['records_read']}, kept: {report['records_kept']}"]
    lines += [f"  skipped {count}: {reason}" for reason, count in sorted(report["skipped"].items())]
    for name, info in report["splits"].items():
        note = "  (empty split)" if info["records"] == 0 else ""
        lines.append(f"{name:>5}: {info['records']} records, {info['windows']} windows, "
                     f"{info['tokens']} tokens -> {Path(out_dir) / name}{note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_entry(lambda: report_text(prepare(args), args.output_dir))


if __name__ == "__main__":
    sys.exit(main())
