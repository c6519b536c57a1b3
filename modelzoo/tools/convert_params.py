"""Translate a Cerebras Model Zoo params file into this toolkit's layout, to see and keep it.

    python -m modelzoo.tools.convert_params --input mz.yaml --output ours.yaml

run.py reads Model Zoo files directly (docs/modelzoo.md); this writes the very params such a run
uses as a native file: every default filled in, a comment on each Model Zoo key that was
ignored (with its value and why), and the notes of the translation (e.g. vocab_size set to 69).
The data directories need not exist here, except to read from the shards' manifest a missing
max_sequence_length and the reading_frame and pack_sequences they were prepared with (without
one, the written file has the defaults: as_read, unpacked). Every problem of the input is one line (exit 2) and nothing is written. An
existing output is replaced only with --overwrite, and only when this tool wrote it.
"""

from __future__ import annotations

import yaml

from modelzoo.config import ConfigError, read_yaml, validate_params
from modelzoo.entry import OneLineParser, run_entry
from modelzoo.files import output_file
from modelzoo.modelzoo_params import is_modelzoo_file, translate

PROG = "python -m modelzoo.tools.convert_params"
TOOL = "modelzoo.tools.convert_params"  # the owner named in its output's modelzoo.files marker
SECTIONS = ("train_input", "eval_input", "model", "optimizer", "sparsity", "runconfig")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Write a Cerebras Model Zoo params file in this toolkit's layout.")
    p.add_argument("--input", required=True, help="Model Zoo params yaml (sectioned or trainer: layout)")
    p.add_argument("--output", required=True, help="native params yaml to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of this tool")
    return p


def convert(source: str, output: str, overwrite: bool = False) -> str:
    raw, lines = read_yaml(source)
    if not is_modelzoo_file(raw):
        raise ConfigError(f"{source}: already this toolkit's layout (no trainer: key, no Model Zoo-only key, and "
                          f"model.name given); run.py reads it as it is")
    translation = translate(raw, source)
    params = validate_params(translation.params, source, check_paths=False, lines=lines, translation=translation)
    text = native_yaml(params.model_dump(mode="json"), raw, translation, source)
    with output_file(output, TOOL, overwrite, "w", inputs=[source]) as f:
        f.write(text)
    return f"wrote {output}: {params.model.name}, {len(translation.ignored)} Model Zoo keys ignored (commented)"


def native_yaml(params: dict, raw: dict, translation, source: str) -> str:
    """Our params as yaml, each ignored key commented under the section it came from."""
    comments: dict[str, list[str]] = {}
    for path, why in translation.ignored.items():
        section = _native_section(path)
        value = _value_at(raw, path)
        shown = "" if isinstance(value, (dict, list)) else f": {value}"
        comments.setdefault(section, []).append(f"# ignored: {'.'.join(path)}{shown} ({why})")
    out = [f"# Written by {TOOL} from {source} (a Cerebras Model Zoo params file); docs/modelzoo.md says what "
           f"each Model Zoo key became."]
    out += [f"# note: {note}" for note in translation.notes[1 if translation.ignored else 0:]]
    out += comments.pop("", [])
    for section in SECTIONS:
        if params.get(section) is None:
            continue
        body = yaml.safe_dump({section: params[section]}, sort_keys=False)
        header, _, rest = body.partition("\n")
        out += [header, *("  " + c for c in comments.pop(section, [])), rest.rstrip("\n")]
    return "\n".join(out) + "\n"


def _native_section(path: tuple) -> str:
    """Which of our sections a Model Zoo key's comment goes under ('' for the top)."""
    first = path[0]
    if first in SECTIONS:
        return first
    trainer = {("init", "model"): "model", ("init", "optimizer"): "optimizer", ("init", "sparsity"): "sparsity",
               ("init", "precision"): "model", ("init", "loop"): "runconfig", ("init", "checkpoint"): "runconfig",
               ("init", "logging"): "runconfig", ("fit", "train_dataloader"): "train_input",
               ("fit", "val_dataloader"): "eval_input"}
    return trainer.get(tuple(path[1:3]), "")


def _value_at(raw, path: tuple):
    for part in path:
        if isinstance(raw, dict):
            raw = raw.get(part)
        elif isinstance(raw, list) and part.isdigit() and int(part) < len(raw):
            raw = raw[int(part)]
        else:
            return None
    return raw


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_entry(lambda: convert(args.input, args.output, args.overwrite))


if __name__ == "__main__":
    raise SystemExit(main())
