"""The fast paths give the same answers as the slow references: the block FASTA reader vs
Biopython, the batched codon encoder vs one call per sequence, fp32 attention under bf16."""

import gzip
import io

import numpy as np
import pytest
import torch
from Bio import SeqIO

from modelzoo.data import sequences
from modelzoo.data.sequences import read_records
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import DataError
from modelzoo.models import build_model
from tests.helpers import tiny_config

# Line endings of three kinds, a blank line inside a record, tabs and '>' inside a header, a '>'
# inside a sequence line, spaces inside a sequence, a record with no sequence, no final newline.
AWKWARD_FASTA = (b">one first record\r\nACGTAC\r\nGGT\r\n\r\nTTA\r\n"
                 b">two\tdesc >not a new record\nacgu>ac\nAC GT\n"
                 b">three\rNNNACG\rT\r"
                 b">empty\n"
                 b">last\nACGTACGTA")


def biopython_records(data: bytes) -> list[tuple[str, str]]:
    text = io.TextIOWrapper(io.BytesIO(data), encoding="latin-1", newline=None)
    return [(r.id, str(r.seq)) for r in SeqIO.parse(text, "fasta")]


@pytest.mark.parametrize("block", [1 << 26, 5, 1])  # one read, and reads that cut records and CR LF pairs
def test_block_reader_reads_what_biopython_reads(tmp_path, monkeypatch, block):
    monkeypatch.setattr(sequences, "_FASTA_BLOCK", block)
    path = tmp_path / "awkward.fa"
    path.write_bytes(AWKWARD_FASTA)
    ours = [(r.id, r.seq) for r in read_records(path, allow_empty=True)]
    assert ours == biopython_records(AWKWARD_FASTA)
    assert [i for i, _ in ours] == ["one", "two", "three", "empty", "last"]
    raw = list(read_records(path, allow_empty=True, raw=True))
    tok = CodonTokenizer()
    assert [tok.encode(r.seq).tolist() for r in raw] == [tok.encode(s).tolist() for _, s in ours]


def test_multi_member_and_padded_gzip_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(sequences, "_FASTA_BLOCK", 16)
    path = tmp_path / "two_members.fa.gz"
    path.write_bytes(gzip.compress(b">a\nACGT\nAC\n") + gzip.compress(b">b\nGGGCCC\n") + b"\x00" * 8)
    assert [(r.id, r.seq) for r in read_records(path)] == [("a", "ACGTAC"), ("b", "GGGCCC")]
    truncated = tmp_path / "truncated.fa.gz"
    truncated.write_bytes(gzip.compress(b">a\n" + b"ACGT" * 5000)[:-12])
    with pytest.raises(DataError, match="truncated gzip"):
        list(read_records(truncated))


def encoded_apart(tok: CodonTokenizer, seqs) -> list[list[int]]:
    ids, starts, counts = tok.encode_flat(seqs)
    assert len(starts) == len(counts) == len(seqs)
    return [ids[a:a + n].tolist() for a, n in zip(starts.tolist(), counts.tolist())]


def test_encode_flat_equals_one_call_per_sequence():
    tok = CodonTokenizer()
    seqs = ["", "A", "AC", "ACG", "acgu\nTTA", "ACGNNRTTTA", b"GGG\r\nCCCA", "AT\u00e9GGCC", "ACGT" * 1001]
    assert encoded_apart(tok, seqs) == [tok.encode(seq).tolist() for seq in seqs]
    assert encoded_apart(tok, []) == []
    # the slow tokenizers reference agrees on a real genome
    genome = "".join(s for _, s in biopython_records(AWKWARD_FASTA))
    assert encoded_apart(tok, [genome]) == [tok.encode_with_tokenizers(genome)]


def test_attention_in_fp32_under_bf16_autocast(monkeypatch):
    """attention_in_fp32: the attention kernel gets fp32 q/k/v under bf16 autocast (without it,
    bf16), the block's output stays in the autocast dtype, and the model trains."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kw):
        seen.append(q.dtype)
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    ids = torch.randint(5, 69, (2, 32), generator=torch.Generator().manual_seed(0))
    for flag, expected in ((False, torch.bfloat16), (True, torch.float32)):
        cfg = tiny_config("gptj", hidden_size=64, max_position_embeddings=32, mixed_precision=True,
                          attention_in_fp32=flag)
        model = build_model(cfg)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model({"input_ids": ids, "labels": ids})["loss"]
            attn_out = model.blocks[0].attn(torch.randn(2, 32, 64))
        assert seen and set(seen) == {expected}
        assert attn_out.dtype == torch.bfloat16
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_unk_counts_ignore_the_filler_between_sequences():
    from data_preparation.prepare_genomes import _unk_counts
    tok = CodonTokenizer()
    # "AC" leaves a completed partial codon ([UNK]) that belongs to no sequence; so does "ACGN"
    ids, starts, counts = tok.encode_flat([b"AC", b"NNNACG", b"ACGN", b"TTT"])
    assert counts.tolist() == [0, 2, 1, 1]
    assert (ids == tok.unk_id).sum() == 3
    assert _unk_counts(ids, starts, counts, tok.unk_id).tolist() == [0, 1, 0, 0]


def test_duplicate_ids_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sequences, "_FASTA_BLOCK", 4)  # every record in a batch of its own
    path = tmp_path / "dup.fa"
    path.write_bytes(b">a\nACG\n>b\nTTT\n>a\nGGG\n>a\nCCC\n")
    with pytest.raises(DataError, match="duplicate record id 'a'"):
        list(read_records(path))
    assert [r.id for r in read_records(path, rename_duplicates=True)] == ["a", "b", "a#2", "a#3"]


def test_shard_writer_add_many_equals_add(tmp_path):
    tok = CodonTokenizer()
    rows = np.full((5, 8), tok.pad_id, dtype=np.uint8)
    for i, n in enumerate([8, 3, 8, 1, 5]):
        rows[i, :n] = 7 + i
    ids, counts = ["a", "empty", "b", "c"], [2, 0, 1, 2]
    from modelzoo.data.shards import ShardWriter
    with ShardWriter(tmp_path / "one", 8, tok, windows_per_file=3) as one:
        for rec_id, lo, hi in zip(ids, np.cumsum([0] + counts[:-1]), np.cumsum(counts)):
            one.add(rec_id, rows[lo:hi])
    with ShardWriter(tmp_path / "many", 8, tok, windows_per_file=3) as many:
        many.add_many(ids[:2], counts[:2], rows[:2])
        many.add_many(ids[2:], counts[2:], rows[2:])
    assert one.manifest == many.manifest
    from modelzoo.data.shards import ShardSet
    assert ShardSet(tmp_path / "many").records.num_tokens.tolist() == [11, 0, 8, 6]
    with pytest.raises(ValueError, match="does not cut"):
        many.add_many(["x"], [2], rows[:1])
