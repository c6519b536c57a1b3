import gzip
import shutil

import pytest

from modelzoo.data import sequences
from modelzoo.data.sequences import Record, read_records
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import DataError
from tests.helpers import AWKWARD_FASTA, DATA, biopython_records


def one_line_error(path, **kw) -> str:
    with pytest.raises(DataError) as info:
        list(read_records(path, **kw))
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_fasta_gz_and_plain(tmp_path):
    recs = list(read_records(DATA / "nextstrain_example_first3.fasta.gz"))
    assert [r.id for r in recs] == ["Wuhan/Hu-1/2019", "Wuhan/WH01/2019", "Australia/VIC05/2020"]
    assert len(recs[0].seq) == 29903 and isinstance(recs[0], Record)
    # gzip is detected by magic bytes, not by the name
    plain = tmp_path / "genomes.gz"
    plain.write_text(">a desc\nACGT\nACGT\n")
    assert list(read_records(plain)) == [Record("a", "ACGTACGT")]


def test_genbank_whole_record_and_cds():
    (rec,) = read_records(DATA / "NC_045512.2.gb")
    assert rec.id == "NC_045512.2" and len(rec.seq) == 29903
    cds = list(read_records(DATA / "NC_045512.2.gb", features="CDS"))
    assert len(cds) == 12
    orf1ab = cds[0]
    assert orf1ab.id == "NC_045512.2|GU280_gp01|YP_009724389.1"
    # the ribosomal slippage join: 13468-266+1 + 21555-13468+1 nt
    assert len(orf1ab.seq) == 21291 and orf1ab.seq.startswith("ATG") and orf1ab.seq.endswith("TAA")
    assert orf1ab.seq == rec.seq[265:13468] + rec.seq[13467:21555]
    ypestis = list(read_records(DATA / "ypestis_pPCP1_NC_005816.gb", features="CDS"))
    assert len(ypestis) == 10 and all(len(r.seq) % 3 == 0 for r in ypestis)
    assert ypestis[5].id == "NC_005816.1|YP_pPCP06|NP_995572.1"  # minus strand, reverse-complemented
    assert ypestis[5].seq.startswith("ATG")


def test_crlf_and_single_line_genome(tmp_path):
    seq = next(iter(read_records(DATA / "NC_045512.2.gb"))).seq
    crlf = tmp_path / "crlf.fa"
    crlf.write_bytes(b">g1\r\n" + seq[:60].encode() + b"\r\n" + seq[60:120].encode() + b"\r\n")
    assert list(read_records(crlf)) == [Record("g1", seq[:120])]
    single = tmp_path / "single.fa.gz"
    with gzip.open(single, "wt") as fh:
        fh.write(f">whole\n{seq}\n")
    assert list(read_records(single))[0].seq == seq
    gb_crlf = tmp_path / "crlf.gb"
    gb_crlf.write_bytes((DATA / "ypestis_pPCP1_NC_005816.gb").read_bytes().replace(b"\n", b"\r\n"))
    assert len(list(read_records(gb_crlf, features="CDS"))) == 10


def test_bad_inputs(tmp_path):
    html = tmp_path / "page.fasta"
    html.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    assert "HTML" in one_line_error(html)

    binary = tmp_path / "x.fa"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "binary" in one_line_error(binary)

    empty = tmp_path / "empty.fa"
    empty.write_bytes(b"\n\n")
    assert "empty" in one_line_error(empty)

    corrupt = tmp_path / "corrupt.fa.gz"
    corrupt.write_bytes((DATA / "nextstrain_example_first3.fasta.gz").read_bytes()[:3000])
    assert "gzip" in one_line_error(corrupt)

    garbage_gz = tmp_path / "garbage.fa.gz"
    garbage_gz.write_bytes(b"\x1f\x8b" + b"not really gzip data" * 10)
    assert "gzip" in one_line_error(garbage_gz)

    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    assert "not FASTA" in one_line_error(text)

    assert "no such file" in one_line_error(tmp_path / "missing.fa")


def test_bad_records(tmp_path):
    dup = tmp_path / "dup.fa"
    dup.write_text(">a\nACGT\n>b\nACGT\n>a\nTTTT\n")
    msg = one_line_error(dup)
    assert "duplicate" in msg and "'a'" in msg
    assert [r.id for r in read_records(dup, rename_duplicates=True)] == ["a", "b", "a#2"]

    nothing = tmp_path / "noseq.fa"
    nothing.write_text(">a\nACGT\n>b\n>c\nAC\n")
    assert "'b' has no sequence" in one_line_error(nothing)
    assert [r.seq for r in read_records(nothing, allow_empty=True)] == ["ACGT", "", "AC"]

    assert "GenBank" in one_line_error(dup, features="CDS")

    no_origin = tmp_path / "no_origin.gb"
    text = (DATA / "ypestis_pPCP1_NC_005816.gb").read_text()
    no_origin.write_text(text[: text.index("FEATURES")] + "CONTIG      join(AE017042.1:1..9609)\n//\n")
    assert "has no sequence" in one_line_error(no_origin)
    assert list(read_records(no_origin, allow_empty=True)) == [Record("NC_005816.1", "")]

    truncated = tmp_path / "truncated.gb"
    truncated.write_text(text[: text.index("ORIGIN")] + "//\n")
    assert "cannot parse" in one_line_error(truncated)


def test_format_sniffed_from_content(tmp_path):
    gb = tmp_path / "reference.fasta"  # misleading name
    shutil.copy(DATA / "ypestis_pPCP1_NC_005816.gb", gb)
    assert [r.id for r in read_records(gb)] == ["NC_005816.1"]


def test_unreadable_inputs_are_one_line_errors(tmp_path, monkeypatch):
    from modelzoo.data import sequences
    from modelzoo.data.sequences import read_record_chunks

    folder = tmp_path / "genomes.fa"
    folder.mkdir()
    assert "not a file" in one_line_error(folder)
    locked = tmp_path / "locked.fa"
    locked.write_text(">a\nACGT\n")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sequences, "open", denied, raising=False)  # chmod 000 does not stop root
    assert "cannot read (Permission denied)" in one_line_error(locked)
    with pytest.raises(DataError, match="cannot read"):
        list(read_record_chunks(locked))


# ------------------------------------------------------------------ the block reader against Biopython

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


def test_duplicate_ids_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sequences, "_FASTA_BLOCK", 4)  # every record in a batch of its own
    path = tmp_path / "dup.fa"
    path.write_bytes(b">a\nACG\n>b\nTTT\n>a\nGGG\n>a\nCCC\n")
    with pytest.raises(DataError, match="duplicate record id 'a'"):
        list(read_records(path))
    assert [r.id for r in read_records(path, rename_duplicates=True)] == ["a", "b", "a#2", "a#3"]
