"""reading_frame longest_orf: every genome read in the frame of its longest stop-free run of codons,
in preparation, training and inference alike."""

import json

import numpy as np
import pytest

from data_preparation.prepare_genomes import main as prepare_main
from modelzoo import GenomeLM
from modelzoo.cli import main
from modelzoo.data.sequences import read_records
from modelzoo.data.shards import ShardSet
from modelzoo.data.tokenizer import CodonTokenizer
from tests.helpers import DATA, GENOMES, tiny_params, write_params

TOK = CodonTokenizer()
STOPS = {"TAA", "TAG", "TGA"}
ORF1AB_START = "ATGGAGAGCCTTGTCCCTGG"  # first 20 nt of ORF1ab (NC_045512.2 nt 266)


def longest_stop_free_run(seq: str, offset: int) -> int:
    """Reference implementation: the longest run of codons without a stop, reading from offset."""
    best = run = 0
    for i in range(offset, len(seq) - 2, 3):
        run = 0 if seq[i: i + 3] in STOPS else run + 1
        best = max(best, run)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_longest_orf_picks_the_frame_of_the_longest_stop_free_run(seed):
    rng = np.random.default_rng(seed)
    seq = "".join(rng.choice(list("ACGT"), size=int(rng.integers(0, 400))))
    runs = [longest_stop_free_run(seq, f) for f in range(3)]
    offset = TOK.frame_offset(seq, "longest_orf")
    assert runs[offset] == max(runs) and offset == runs.index(max(runs))  # ties: fewest dropped
    assert np.array_equal(TOK.encode(seq, "longest_orf"), TOK.encode(seq[offset:]))
    assert TOK.frame_offset(seq, "as_read") == 0 and np.array_equal(TOK.encode(seq, "as_read"), TOK.encode(seq))


def test_whitespace_and_case_do_not_move_the_frame():
    seq = "ccGATGAAGAAATAACCtaa"  # frames 0 and 1 meet a stop early; frame 2 reads 5 codons first
    assert TOK.frame_offset(seq, "longest_orf") == 2
    spaced = " c c\nGAT GAA\tGAA ATA ACC TAA"
    assert TOK.frame_offset(spaced, "longest_orf") == 2
    assert np.array_equal(TOK.encode(spaced, "longest_orf"), TOK.encode("GATGAAGAAATAACCTAA"))
    with pytest.raises(ValueError, match="reading_frame 'orf'"):
        TOK.encode(seq, "orf")


def test_every_sars_cov_2_genome_is_read_in_orf1abs_frame():
    """The shipped genomes start at different points of the 5' end: as read, they sit in all three
    frames; longest_orf reads each in ORF1ab's."""
    frames, as_read = [], []
    for rec in read_records(DATA.parent.parent / "data" / "sars_cov_2" / "nextstrain_2020_example_sequences.fasta.gz"):
        start = rec.seq.upper().find(ORF1AB_START)
        if start >= 0:
            frames.append(TOK.frame_offset(rec.seq, "longest_orf") == start % 3)
            as_read.append(start % 3)
    assert len(frames) > 400 and all(frames)
    assert set(as_read) == {0, 1, 2}


def test_prepare_writes_shards_in_the_reading_frame(tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare_main(["--input", str(GENOMES), "--output_dir", str(out), "--max_seq_length", "64",
                         "--split", "1,0,0", "--reading_frame", "longest_orf"]) == 0
    train = ShardSet(out / "train")
    assert train.manifest["created_by"]["options"]["reading_frame"] == "longest_orf"
    seqs = {r.id: r.seq for r in read_records(GENOMES)}
    first = train.record_ids[0]
    assert np.array_equal(train[0], TOK.encode(seqs[first], "longest_orf")[:64])


def test_run_reads_the_frame_its_params_name_and_inference_follows(tmp_path, capsys):
    raw = tiny_params(tmp_path / "shards", tmp_path / "md", max_steps=2)
    for section in ("train_input", "eval_input"):
        raw[section]["prepare"] = {"input": [str(GENOMES)], "split": [0.67, 0.33, 0.0]}
        raw[section]["reading_frame"] = "longest_orf"
    assert main(["CPU", "--params", str(write_params(tmp_path / "p.yaml", raw))]) == 0
    manifest = json.loads((tmp_path / "shards" / "train" / "manifest.json").read_text())
    assert manifest["created_by"]["options"]["reading_frame"] == "longest_orf"
    lm = GenomeLM.load(tmp_path / "md")
    assert lm.reading_frame == "longest_orf"
    seq = "ccGATGAAGAAATAACCtaa"
    assert lm.codons(seq) == (["GAT", "GAA", "GAA", "ATA", "ACC", "TAA"], 2)
    assert len(lm.codon_log_probs([seq])[0]) == 6

    # the shards are longest_orf: params saying as_read are refused in one line, nothing written
    for section in ("train_input", "eval_input"):
        raw[section]["reading_frame"] = "as_read"
    raw["runconfig"]["model_dir"] = str(tmp_path / "md2")
    assert main(["CPU", "--params", str(write_params(tmp_path / "q.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "reading_frame is as_read but the shards in" in err[-1] and "longest_orf" in err[-1]
    assert not (tmp_path / "md2").exists()


def test_train_and_eval_must_read_the_same_frame(tmp_path, capsys):
    raw = tiny_params(tmp_path / "shards", tmp_path / "md")
    raw["train_input"]["reading_frame"] = "longest_orf"
    assert main(["CPU", "--params", str(write_params(tmp_path / "p.yaml", raw)), "--validate_only"]) == 2
    assert "eval_input.reading_frame" in capsys.readouterr().err
