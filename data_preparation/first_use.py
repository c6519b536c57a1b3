"""Build a params file's shard directories on first use (the ``prepare:`` key of an input section).

So the quickstart needs nothing but the raw genomes in the repo: the first run prepares them
with the options a user would give prepare_genomes (printed as that command), later runs find the
shards and skip this. A missing split of a directory prepare_genomes wrote earlier is prepared
again (with --overwrite, which replaces only prepare_genomes' own output); a directory holding
anything else is left alone.
"""

from __future__ import annotations

from pathlib import Path

from data_preparation import prepare_genomes
from data_preparation.prepare_genomes import PrepareOptions
from modelzoo.config import DataInput, Params
from modelzoo.data.shards import manifest_fields
from modelzoo.errors import DataError
from modelzoo.files import foreign_files


def options_for(section: DataInput, overwrite: bool = False) -> PrepareOptions:
    """The prepare_genomes options that make an input section's shards (its data_dir's parent
    gets every split)."""
    spec = section.prepare
    return PrepareOptions(input=tuple(map(str, spec.input)), output_dir=str(Path(section.data_dir).parent),
                          max_seq_length=section.max_seq_length, split=tuple(map(float, spec.split)),
                          seed=spec.seed, features=spec.features, rename_duplicate_ids=spec.rename_duplicate_ids,
                          reading_frame=section.reading_frame, pack_sequences=section.pack_sequences,
                          overwrite=overwrite)


def check_prepared(name: str, section: DataInput) -> None:
    """A data_dir prepared earlier must hold what the section asks for now: packed or not. A
    preset that packs needs its own data_dir (e.g. data/x_packed/train); flipping pack_sequences
    on a prepared one would read the other kind of windows."""
    fields = manifest_fields(section.data_dir)  # the top-level ones: never a version 1 manifest's records
    if fields is None:
        return  # not a readable shard manifest: opening the shards says what is wrong
    packed = bool(fields.get("packed", False))
    if packed != section.pack_sequences:
        kind = "packed" if packed else "unpacked"
        raise DataError(f"{name}.data_dir: {section.data_dir} holds {kind} shards but {name}.pack_sequences is "
                        f"{str(section.pack_sequences).lower()}; give this section its own data_dir (packed and "
                        f"unpacked preparations of the same genomes cannot share one)")


def ensure_prepared(params: Params) -> None:
    """Prepare every missing data_dir that has a ``prepare`` spec (sections sharing an output_dir
    are prepared once)."""
    for name in ("train_input", "eval_input"):
        section = getattr(params, name)
        if section is None or section.prepare is None:
            continue
        if Path(section.data_dir).is_dir():
            check_prepared(name, section)
            continue
        out_dir = Path(section.data_dir).parent
        earlier = out_dir.is_dir() and any(out_dir.iterdir())
        foreign = foreign_files(out_dir, prepare_genomes.TOOL, prepare_genomes.earlier_output) if earlier else []
        if foreign:
            raise DataError(f"{name}.data_dir: {section.data_dir} is missing, and {out_dir} holds {foreign[0]!r}, "
                            f"which prepare_genomes did not write; move it away (or delete {out_dir}) to prepare "
                            f"the shards there")
        options = options_for(section, overwrite=earlier)
        print(f"preparing shards: {prepare_genomes.COMMAND} " + " ".join(options.argv()), flush=True)
        report = prepare_genomes.prepare(options)
        print(prepare_genomes.report_text(report, str(out_dir)), flush=True)
        if not Path(section.data_dir).is_dir():
            raise DataError(f"{name}.data_dir: preparation wrote no {Path(section.data_dir).name} split "
                            f"(check prepare.split)")
