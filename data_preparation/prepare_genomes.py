"""Genomes (FASTA/GenBank, plain or .gz) -> train/val/test codon token shards.

    python -m data_preparation.prepare_genomes --input a.fasta.gz b.gb --output_dir data/ \\
        --max_seq_length 2048 --split 0.9,0.05,0.05 --seed 0 [--pack_sequences] [--num_workers N]

Records are split (not windows), so a genome never straddles train and test; within a split they
keep their input order. The split is drawn over consecutive groups of 65,536 kept records (fewer
when they hold 2^26 codons): a seeded permutation of each group deals round(fraction x records)
to each split, so the proportions are exact however large the input, and a set of one group is
split as by one permutation of all its records (``windows.SplitDealer``).

A genome longer than max_seq_length codons becomes consecutive non-overlapping windows; the last
is padded with [PAD], or dropped when shorter than --min_codons. --pack_sequences fills each
window with whole records back to back, each followed by one [SEP], then [PAD]: a record that fits
(codons + 1 <= max_seq_length) is never split across two windows; a longer one gets windows of its
own, cut as above, with no [SEP] (``windows.Packer``; the manifest says "packed": true).
--reading_frame longest_orf reads each record from the frame of its longest stop-free run of
codons (``CodonTokenizer``), so genomes trimmed differently at the 5' end share one frame.

Memory does not grow with the input (apart from 10 bytes a record id, to find repeated ids):
records are read, tokenised and written a chunk and a group at a time, on --num_workers processes
(default: every core). The output is deterministic: same inputs and options give byte-identical
shards, whatever the number of workers. DIR appears complete or not at all; --overwrite replaces
an earlier output of this tool only, never a directory holding anything else (or an input).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_preparation import pipeline, windows
from data_preparation.pipeline import unk_counts as _unk_counts  # noqa: F401 (tests use the old name)
from data_preparation.windows import windows_of  # noqa: F401
from modelzoo.config import SEED_RANGE
from modelzoo.data.shards import ShardWriter, file_sha256, shard_files
from modelzoo.data.tokenizer import READING_FRAMES, CodonTokenizer
from modelzoo.entry import OneLineParser, run_entry
from modelzoo.errors import DataError, UserError
from modelzoo.files import check_path, output_dir

SPLITS = ("train", "val", "test")
COMMAND = "python -m data_preparation.prepare_genomes"
TOOL = "data_preparation.prepare_genomes"  # the owner named in its output's modelzoo.files.OWNER_MARKER
MAX_SEQ_LENGTH = 1 << 20  # codons per window: 3 Mb, beyond any context trained here (GenSLM's longest: 10,240)
MAX_WORKERS = 1024  # processes: more is a typo, not a machine


@dataclass(frozen=True)
class PrepareOptions:
    """What prepare_genomes is asked to do, typed: its command line (``parse_args``) and a params
    file's ``prepare:`` section (``data_preparation.first_use``) both give one to ``prepare``.
    The fields are its flags (their help says what each means)."""
    input: tuple[str, ...]
    output_dir: str
    max_seq_length: int
    split: tuple[float, ...] = (0.9, 0.05, 0.05)
    seed: int = 0
    features: str | None = None
    max_n_fraction: float = 0.5
    min_codons: int = 8
    rename_duplicate_ids: bool = False
    reading_frame: str = "as_read"
    pack_sequences: bool = False
    num_workers: int | None = None
    windows_per_file: int = 1 << 16
    overwrite: bool = False

    def argv(self) -> list[str]:
        """The command-line flags that give these options (the defaults left out)."""
        out = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.default is not dataclasses.MISSING and value == field.default:
                continue
            flag = f"--{field.name}"
            if isinstance(value, bool):
                out += [flag] if value else []
            elif field.name == "input":
                out += [flag, *map(str, value)]
            else:
                out += [flag, split_text(value) if field.name == "split" else str(value)]
        return out


def parse_args(argv=None) -> PrepareOptions:
    p = OneLineParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="FASTA/GenBank files, plain or .gz")
    p.add_argument("--output_dir", required=True, help="gets train/, val/, test/ shard dirs")
    p.add_argument("--max_seq_length", type=int, required=True, help="codons per window")
    p.add_argument("--split", type=split_fractions, default="0.9,0.05,0.05", help="train,val,test record fractions")
    p.add_argument("--seed", type=int, default=0, help="seed of the record split")
    p.add_argument("--features", default=None, help="GenBank feature type to extract, e.g. CDS")
    p.add_argument("--max_n_fraction", type=float, default=0.5,
                   help="skip records whose fraction of [UNK] codons is above this")
    p.add_argument("--min_codons", type=int, default=8,
                   help="skip shorter records; drop a trailing window shorter than this")
    p.add_argument("--rename_duplicate_ids", action="store_true",
                   help="suffix repeated record ids with #2, #3... instead of failing")
    p.add_argument("--reading_frame", choices=READING_FRAMES, default="as_read",
                   help="as_read: codons from each record's first nucleotide; longest_orf: drop 0-2 leading "
                        "nucleotides to put the record's longest stop-free run of codons in frame")
    p.add_argument("--pack_sequences", action="store_true",
                   help="fill each window with whole records back to back, each followed by [SEP]")
    p.add_argument("--num_workers", type=int, default=None,
                   help="processes that tokenise (default: every core); the output is the same for any")
    p.add_argument("--windows_per_file", type=int, default=1 << 16)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of this tool (never a directory holding other files)")
    args = vars(p.parse_args(argv))
    return PrepareOptions(**{**args, "input": tuple(args["input"])})


SPLIT_NEEDS = "need three non-negative fractions summing to 1, e.g. 0.9,0.05,0.05"


def split_fractions(text: str) -> tuple[float, ...]:
    """--split's text as fractions (checked by ``check_options``)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {SPLIT_NEEDS}") from None


def split_text(fracs) -> str:
    return ",".join(f"{f:g}" for f in fracs)


def earlier_output(out_dir: Path) -> set[str] | None:
    """What prepare_genomes wrote into ``out_dir`` before its outputs carried an owner marker
    (``modelzoo.files.OWNER_MARKER``): split directories of its shards, each listing its files
    in its manifest; None when there is none."""
    owned = set()
    for name in SPLITS:
        files = shard_files(out_dir / name, command=COMMAND)
        owned |= {f"{name}/{f}" for f in files or ()}
    return owned or None


def check_options(args: PrepareOptions) -> tuple[float, float, float]:
    """Every option in range, in one line each, before anything is read or written; the split."""
    fracs = tuple(float(f) for f in args.split)
    problems = [
        (len(fracs) != 3 or not all(0 <= f <= 1 for f in fracs) or abs(sum(fracs) - 1.0) > 1e-6,
         f"--split {split_text(fracs)!r}: {SPLIT_NEEDS}"),
        (not 1 <= args.max_seq_length <= MAX_SEQ_LENGTH,
         f"--max_seq_length {args.max_seq_length}: need 1 to {MAX_SEQ_LENGTH:,} codons (a window is one row in "
         f"memory and on disk)"),
        (args.min_codons < 1, f"--min_codons {args.min_codons}: need at least 1"),
        (args.pack_sequences and args.max_seq_length < 2,
         "--pack_sequences needs --max_seq_length of at least 2 (a codon and its [SEP])"),
        (args.num_workers is not None and not 1 <= args.num_workers <= MAX_WORKERS,
         f"--num_workers {args.num_workers}: need 1 to {MAX_WORKERS}"),
        (args.windows_per_file < 1, f"--windows_per_file {args.windows_per_file}: need at least 1"),
        (not SEED_RANGE["ge"] <= args.seed <= SEED_RANGE["le"],
         f"--seed {args.seed}: need {SEED_RANGE['ge']} to {SEED_RANGE['le']} (as the params' seeds)"),
        (not 0 <= args.max_n_fraction <= 1, f"--max_n_fraction {args.max_n_fraction}: need a fraction in [0, 1]"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message)
    for path in args.input:
        path = check_path(path, "--input")
        if not path.is_file() or not os.access(path, os.R_OK):
            why = "is a directory" if path.is_dir() else "cannot be read" if path.exists() else "no such file"
            raise DataError(f"--input {path}: {why}")
    return fracs


def prepare(args: PrepareOptions) -> dict:
    """Prepare the shards ``args`` describe; a report of what was read, kept and written."""
    fracs = check_options(args)
    with output_dir(args.output_dir, TOOL, args.overwrite, inputs=args.input, recognise=earlier_output) as tmp:
        return _prepare_into(tmp, args, fracs)


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _prepare_into(tmp_root: Path, args, fracs) -> dict:
    tokenizer = CodonTokenizer()
    options = {  # no output_dir, absolute paths or worker count: the manifest must not depend on them
        "inputs": [{"name": Path(p).name, "sha256": file_sha256(Path(p))} for p in args.input],
        "max_seq_length": args.max_seq_length, "split": list(fracs), "seed": args.seed,
        "split_method": {"name": "permutation_per_group", "group_records": windows.GROUP_RECORDS,
                         "group_codons": windows.GROUP_CODONS},
        "features": args.features, "max_n_fraction": args.max_n_fraction,
        "min_codons": args.min_codons, "rename_duplicate_ids": args.rename_duplicate_ids,
        "pack_sequences": args.pack_sequences, "reading_frame": args.reading_frame,
    }
    report = {"records_read": 0, "records_kept": 0, "skipped": Counter(), "splits": {}}
    with contextlib.ExitStack() as stack:
        outputs = {}
        for name, frac in zip(SPLITS, fracs):
            if frac > 0:
                writer = stack.enter_context(ShardWriter(
                    tmp_root / name, args.max_seq_length, tokenizer, windows_per_file=args.windows_per_file,
                    command=COMMAND, options=dict(options, split_name=name), packed=args.pack_sequences))
                outputs[name] = windows.SplitOutput(writer, args.min_codons, args.pack_sequences)
        groups, dealer = windows.Groups(), windows.SplitDealer(fracs, args.seed)

        def write(group) -> None:
            ids, starts, lengths, codons = group
            for name, members in zip(SPLITS, dealer.deal(len(ids))):
                if name in outputs:
                    outputs[name].add(ids, starts, lengths, codons, members)

        for chunk in _chunks(args, report, stack):
            ids = [chunk.ids[i] for i in chunk.kept.tolist()]
            for group in groups.add(ids, chunk.lengths, chunk.codons):
                write(group)
        if groups.records:
            write(groups.flush())
        for output in outputs.values():
            output.close()
        if not report["records_kept"]:  # e.g. only all-N genomes: refuse rather than publish empty shards
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(report["skipped"].items())) or "the input is empty"
            raise DataError(f"{', '.join(map(str, args.input))}: no usable record among "
                            f"{report['records_read']} read ({why})")
    for name, output in outputs.items():
        w = output.writer
        report["splits"][name] = {"records": w.num_records, "windows": w.num_windows, "tokens": w.num_tokens}
    report["skipped"] = dict(report["skipped"])
    return report


def _chunks(args, report: dict, stack: contextlib.ExitStack):
    """Tokenised chunks of the inputs in order (``pipeline``), repeated ids renamed or refused;
    counts records read, kept and skipped into ``report``."""
    limits = pipeline.Limits(args.min_codons, args.max_n_fraction, args.reading_frame)
    workers = args.num_workers or default_workers()
    items = pipeline.chunks_of(args.input, args.features)
    tasks = ((file, item, limits) for file, item in (pipeline.read_ahead(items) if workers > 1 else items))
    chunks = stack.enter_context(contextlib.closing(pipeline.tokenise_all(tasks, workers)))
    seen = pipeline.SeenIds(len(args.input))
    read_in_file = [0] * len(args.input)  # records read from each input so far
    progress = stack.enter_context(tqdm(desc="reading", unit=" records", file=sys.stderr, disable=None, delay=2.0))
    for chunk in chunks:
        path = args.input[chunk.file]
        if "" in chunk.ids:
            number = read_in_file[chunk.file] + chunk.ids.index("") + 1
            raise DataError(f"{path}: record #{number} has an empty id")
        for pos, first_file, times in seen.add(chunk.hashes, chunk.file):
            rec_id = chunk.ids[pos]
            if first_file != chunk.file:
                raise DataError(f"{path}: record id {rec_id!r} already used in {args.input[first_file]}")
            if not args.rename_duplicate_ids:
                raise DataError(f"{path}: duplicate record id {rec_id!r} "
                                f"(rename_duplicates / --rename_duplicate_ids adds #2, #3...)")
            renamed = f"{rec_id}#{times}"
            if seen.add(pipeline.id_hashes([renamed]), chunk.file):
                raise DataError(f"{path}: record id {rec_id!r} repeats, and {renamed!r}, its new name, is taken")
            chunk.ids[pos] = renamed
        read_in_file[chunk.file] += len(chunk.ids)
        report["records_read"] += len(chunk.ids)
        report["records_kept"] += len(chunk.kept)
        report["skipped"].update(chunk.skipped)
        progress.update(len(chunk.ids))
        yield chunk


def report_text(report: dict, out_dir: str) -> str:
    lines = [f"records read: {report['records_read']}, kept: {report['records_kept']}"]
    lines += [f"  skipped {count}: {reason}" for reason, count in sorted(report["skipped"].items())]
    for name, info in report["splits"].items():
        note = "  (empty split)" if info["records"] == 0 else ""
        lines.append(f"{name:>5}: {info['records']} records, {info['windows']} windows, "
                     f"{info['tokens']} tokens -> {Path(out_dir) / name}{note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    options = parse_args(argv)
    return run_entry(lambda: report_text(prepare(options), options.output_dir))


if __name__ == "__main__":
    sys.exit(main())
