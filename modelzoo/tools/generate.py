"""Generate codon sequences with a trained GPT-2, GPT-J or GPT-NeoX and write them as FASTA.

    python -m modelzoo.tools.generate --model_dir MD --num_sequences 10 --max_codons 500 \\
        --output generated.fasta [--prompt ATG --seed 0 --temperature 1.0 --top_k 20 --top_p 0.95]

Each record is the prompt followed by the sampled codons (only codons: special tokens are never
sampled). A KV cache makes each new codon one single-token forward pass. The output appears
complete or not at all; an existing file is replaced only with --overwrite, and only when this
tool wrote it (never a checkpoint, an input or a user's file).
"""

from __future__ import annotations

import sys
from pathlib import Path

from modelzoo.config import SEED_RANGE
from modelzoo.entry import OneLineParser, run_entry
from modelzoo.errors import ConfigError
from modelzoo.files import output_file
from modelzoo.tools.common import add_model_arguments, model_from_args, model_inputs

PROG = "python -m modelzoo.tools.generate"
TOOL = "modelzoo.tools.generate"  # the owner named in its output's modelzoo.files marker
LINE = 80  # FASTA line width


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_arguments(p, overwrite="replace an earlier --output of this tool (never another file)")
    p.set_defaults(batch_size=32)
    p.add_argument("--num_sequences", type=int, default=1, help="sequences to generate")
    p.add_argument("--max_codons", type=int, required=True, help="codons to generate after the prompt")
    p.add_argument("--output", required=True, help="FASTA file to write")
    p.add_argument("--prompt", default="ATG", help="nucleotides to start from, whole codons (default ATG)")
    p.add_argument("--seed", type=int, help="seed of the sampling (same seed and batch_size: same output)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy")
    p.add_argument("--top_k", type=int, help="sample among the k likeliest codons only")
    p.add_argument("--top_p", type=float, help="sample among the likeliest codons holding this probability mass")
    p.add_argument("--stop_at_stop_codon", action="store_true", help="end a sequence at its first TAA/TAG/TGA")
    return p


def generate(args) -> str:
    if args.seed is not None and not SEED_RANGE["ge"] <= args.seed <= SEED_RANGE["le"]:
        raise ConfigError(f"--seed {args.seed}: must be {SEED_RANGE['ge']} to {SEED_RANGE['le']}")
    with output_file(args.output, TOOL, args.overwrite, inputs=model_inputs(args)) as out:
        lm = model_from_args(args)
        sequences = lm.generate(args.prompt, max_codons=args.max_codons, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, num_return_sequences=args.num_sequences,
                                seed=args.seed, stop_at_stop_codon=args.stop_at_stop_codon,
                                batch_size=args.batch_size, progress=True)
        settings = (f"model={Path(lm.source).name} step={lm.step} seed={args.seed} "
                    f"temperature={args.temperature} top_k={args.top_k} top_p={args.top_p}")
        for k, seq in enumerate(sequences, start=1):
            lines = [f">generated_{k} {settings} codons={len(seq) // 3}"]
            lines += [seq[i: i + LINE] for i in range(0, len(seq), LINE)]
            out.write("\n".join(lines) + "\n")
    return f"wrote {len(sequences)} sequences from {lm.source} to {args.output}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_entry(lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())
