import gzip

import numpy as np
import pytest
from Bio import SeqIO

from modelzoo.data.tokenizer import CodonTokenizer
from tests.helpers import AWKWARD_FASTA, DATA, REPO, biopython_records


@pytest.fixture(scope="module")
def tok():
    return CodonTokenizer()


def real_genomes():
    with gzip.open(DATA / "nextstrain_example_first3.fasta.gz", "rt") as fh:
        seqs = [str(r.seq) for r in SeqIO.parse(fh, "fasta")]
    seqs += [str(r.seq) for r in SeqIO.parse(DATA / "multiclade_nruns_2.fasta", "fasta")]
    return seqs


def test_vocabulary_matches_genslm(tok):
    assert tok.vocab_size == 69
    assert (tok.unk_id, tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert sorted(tok.codon_ids.tolist()) == list(range(5, 69))
    assert len(tok.sha256) == 64 and tok.json_path.name == "codon_wordlevel_69vocab.json"
    assert tok.backend.token_to_id("ATG") == 10


def test_fast_encoder_equals_tokenizers_on_real_genomes(tok):
    seqs = real_genomes()
    assert any("N" * 100 in s for s in seqs)  # the fixtures do exercise N runs
    mutated = seqs[2][:3001].lower() + "\r\n" + seqs[2][3001:6000].replace("T", "U")
    for seq in seqs + [mutated]:
        fast = tok.encode(seq)
        assert fast.dtype == np.uint8
        assert fast.tolist() == tok.encode_with_tokenizers(seq)


def test_normalisation_rules(tok):
    atg, aaa = tok.backend.token_to_id("ATG"), tok.backend.token_to_id("AAA")
    assert tok.encode("atgAAA").tolist() == [atg, aaa]  # lowercase is not [UNK]
    assert tok.encode("AUG").tolist() == [atg]  # RNA
    assert tok.encode("AT G\nA\tAA\r\n").tolist() == [atg, aaa]  # whitespace ignored
    assert tok.encode("ATGAA").tolist() == [atg]  # partial codon dropped
    for bad in ("ANG", "RTG", "A-G", "AT*", "AT\u00e9"):
        assert tok.encode(bad + "ATG").tolist() == [tok.unk_id, atg], bad
        assert tok.encode_with_tokenizers(bad + "ATG") == [tok.unk_id, atg], bad
    assert tok.encode("").tolist() == [] and tok.encode_with_tokenizers("AC") == []


def test_decode(tok):
    ids = tok.encode("ATGnnnCCC")
    assert tok.decode(ids) == "ATGNNNCCC"  # [UNK] decodes as NNN
    specials = [tok.cls_id, *ids.tolist(), tok.sep_id, tok.pad_id, tok.mask_id]
    assert tok.decode(specials) == "ATGNNNCCC"
    seq = real_genomes()[0]
    assert tok.decode(tok.encode(seq)) == seq[: len(seq) // 3 * 3]
    with pytest.raises(ValueError):
        tok.decode([69])


def test_custom_json_path(tmp_path, tok):
    copy = tmp_path / "vocab.json"
    copy.write_bytes(tok.json_path.read_bytes())
    assert CodonTokenizer(copy).sha256 == tok.sha256


def _genslm_recipe():
    """GenSLM's tokenisation as its code does it (genslm/inference.py configure_tokenizer and
    run_inference.py group_by_kmer): a PreTrainedTokenizerFast over its 69-token JSON, fed the
    sequence grouped into threes and uppercased."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    peer = REPO.parent / "shared" / "data" / "peer" / "genslm" / "codon_wordlevel_69vocab.json"
    json_path = peer if peer.is_file() else CodonTokenizer().json_path
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(json_path)))
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})

    def ids(seq: str) -> list[int]:
        grouped = " ".join(seq[i: i + 3] for i in range(0, len(seq), 3)).upper()
        return tokenizer(grouped)["input_ids"]
    return ids


GENSLM_CASES = ["ATGAAACCC", "atgaaaccc", "ATGAAACC", "ATGAAAC", "ATGNNNACGUUU", "ATGRYKACG", "AT1G_CAGG",
                "ATG-AACCC", "ATG AACCCG", "ATG\tAA\nC", "ATGé€CCC", "ACGU", "", "A", "*TAG*", "[PAD]ATG"]


@pytest.mark.parametrize("seq", GENSLM_CASES)
def test_genslm_ids_are_genslms_exactly(tok, seq):
    assert tok.encode(seq, genslm=True).tolist() == _genslm_recipe()(seq)


def test_genslm_ids_on_real_genomes_and_the_default_differences(tok):
    recipe = _genslm_recipe()
    for seq in real_genomes():
        for cut in (len(seq), len(seq) - 1, len(seq) - 2):  # each trailing partial codon
            assert tok.encode(seq[:cut], genslm=True).tolist() == recipe(seq[:cut])
    # the default: the partial codon dropped, RNA read, lowercase the same codons as GenSLM's
    assert tok.encode("ATGAA").tolist() == recipe("ATGAA")[:-1]
    assert tok.encode("atgaaa").tolist() == recipe("atgaaa")
    assert tok.encode("AUG").tolist() == tok.encode("ATG").tolist() != recipe("AUG")
    with pytest.raises(ValueError, match="genslm=True reads as GenSLM does"):
        tok.encode("ATG", "longest_orf", genslm=True)


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
