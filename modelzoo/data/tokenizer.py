"""Codon tokenizer with GenSLM's 69-token vocabulary.

The vocabulary is a HuggingFace ``tokenizers`` WordLevel JSON ([UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3
[MASK]=4, then the 64 codons), so ids match GenSLM checkpoints and files.

Normalisation rules (both encoders apply them, and a test checks they give identical ids):

* ASCII whitespace anywhere in the input (spaces, tabs, CR/LF) is removed first, so the reading
  frame is counted on nucleotides only;
* letters are case-insensitive: ``acg`` is ``ACG`` (as in GenSLM, which uppercases);
* RNA ``U`` is read as ``T``;
* a codon with any other character (``N``, IUPAC codes such as ``R``/``Y``, gap ``-``, stop ``*``,
  digits, non-ASCII) becomes [UNK];
* a trailing partial codon (1 or 2 nucleotides) is dropped.

GenSLM's own recipe (``encode(seq, genslm=True)``) differs in three ways, and gives GenSLM's ids
exactly: it groups the characters as given into threes, uppercases them and splits them into words
with the Whitespace pre-tokenizer, so a trailing partial codon is one final [UNK], ``U`` is [UNK]
(its vocabulary has no RNA), and whitespace or punctuation inside a group splits it into several
[UNK]s. The default keeps dropping the partial codon (nothing was read of it; the shards and models
of this toolkit were made so) and reads RNA.

Reading frame (``reading_frame``): ``as_read`` starts the first codon at the first nucleotide.
``longest_orf`` first drops 0, 1 or 2 leading nucleotides, whichever puts the longest open reading
frame (the longest run of codons without a stop codon TAA/TAG/TGA) in frame, ties going to the
fewest dropped. Genomes trimmed differently at their 5' end then share one frame: in SARS-CoV-2
it is ORF1ab's (two thirds of the genome), where read as-is about half the genomes of a set sit
in one of the two other frames and every one of their codons differs. A gene (CDS) is read as is.

``decode`` is lossy on purpose: [UNK] comes back as ``NNN`` (we cannot know which letters it held)
and the other special tokens ([CLS], [SEP], [PAD], [MASK]) are skipped.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from modelzoo.errors import DataError

PACKAGED_JSON = Path(__file__).with_name("codon_wordlevel_69vocab.json")

_BASES = "ACGT"
_INVALID = 4  # base code for anything that is not A/C/G/T/U
_CODES = _INVALID + 1  # a codon of base codes c0 c1 c2 has index (c0 * 5 + c1) * 5 + c2 < 125
_WHITESPACE = b" \t\n\r\v\f"
_FILLERS = {0: b"", 1: bytes([_INVALID]) * 2, 2: bytes([_INVALID])}  # completes a codon left with 1 or 2 bases
_WHITESPACE_RE = re.compile(r"[ \t\n\r\v\f]+")
_NON_NUCLEOTIDE_RE = re.compile(r"[^ACGTUacgtu]")
_WORD_RE = re.compile(r"[A-Za-z0-9_]*")  # ASCII characters the Whitespace pre-tokenizer keeps in one word
READING_FRAMES = ("as_read", "longest_orf")
# codon indices (over base codes, see _codon_index) of the stop codons TAA, TAG, TGA
_STOP_INDICES = np.array([(3 * _CODES + a) * _CODES + b for a, b in ((0, 0), (0, 2), (2, 0))], dtype=np.uint8)


def _base_codes(rna: bool = True) -> bytes:
    """bytes.translate table: byte -> base code 0-3 (A, C, G, T, and U with ``rna``; any case) or
    _INVALID."""
    table = bytearray([_INVALID]) * 256
    for code, base in enumerate(_BASES):
        table[ord(base)] = table[ord(base.lower())] = code
    if rna:
        table[ord("U")] = table[ord("u")] = _BASES.index("T")
    return bytes(table)


class CodonTokenizer:
    """Codon-level tokenizer: a vectorised numpy fast path plus the ``tokenizers`` reference."""

    def __init__(self, json_path: str | Path | None = None):
        self.json_path = Path(json_path) if json_path is not None else PACKAGED_JSON
        try:
            raw = self.json_path.read_bytes()
            self.backend = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # OSError, bad UTF-8, or tokenizers' own plain Exception
            raise DataError(f"{self.json_path}: cannot load tokenizer JSON ({exc})") from None
        self.sha256 = hashlib.sha256(raw).hexdigest()

        vocab = self.backend.get_vocab()
        names = {"unk_id": "[UNK]", "cls_id": "[CLS]", "sep_id": "[SEP]",
                 "pad_id": "[PAD]", "mask_id": "[MASK]"}
        missing = [tok for tok in names.values() if tok not in vocab]
        codons = [a + b + c for a in _BASES for b in _BASES for c in _BASES]
        missing += [c for c in codons if c not in vocab]
        if missing:
            raise DataError(f"{self.json_path}: vocabulary lacks tokens {missing[:5]}")
        if max(vocab.values()) > 255:
            raise DataError(f"{self.json_path}: token ids above 255 do not fit the uint8 shards")
        for attr, tok in names.items():
            setattr(self, attr, vocab[tok])
        self.vocab_size = self.backend.get_vocab_size()

        # Codon index a*16 + b*4 + c (bases in ACGT order) -> token id.
        self._codon_table = np.array([vocab[c] for c in codons], dtype=np.uint8)
        self.codon_ids = np.sort(self._codon_table)
        self._base_codes = _base_codes()
        self._genslm_codes = _base_codes(rna=False)
        # Codon index over base codes 0-4 -> token id ([UNK] wherever a base is _INVALID), as a
        # 256-byte bytes.translate table.
        code_table = bytearray([self.unk_id]) * 256
        for i, codon in enumerate(codons):
            a, b, c = (_BASES.index(x) for x in codon)
            code_table[(a * _CODES + b) * _CODES + c] = self._codon_table[i]
        self._code_table = bytes(code_table)
        self._special_ids = np.array(sorted(set(vocab[t] for t in names.values())))
        # Token id -> 3 ASCII bytes, for decode; specials stay zero and are filtered out.
        self._decode_table = np.zeros((self.vocab_size, 3), dtype=np.uint8)
        for codon, tid in zip(codons, self._codon_table):
            self._decode_table[tid] = np.frombuffer(codon.encode(), dtype=np.uint8)
        self._decode_table[self.unk_id] = np.frombuffer(b"NNN", dtype=np.uint8)

    def encode(self, seq: str | bytes, reading_frame: str = "as_read", genslm: bool = False) -> np.ndarray:
        """Nucleotides -> uint8 codon ids, one per whole codon (see the module docstring);
        ``genslm``: GenSLM's ids exactly (its recipe, read from the first character)."""
        if genslm:
            if reading_frame != "as_read":
                raise ValueError("genslm=True reads as GenSLM does: from the first nucleotide (reading_frame as_read)")
            return self._genslm_ids(seq)
        return self._codon_ids(self._codes(seq, reading_frame))

    def _genslm_ids(self, seq: str | bytes) -> np.ndarray:
        """GenSLM's ``tokenizer(" ".join(seq[i:i + 3] ...).upper())``: vectorised where every
        character is an ASCII word character (each group of three is then one word), else through
        the ``tokenizers`` library itself."""
        if isinstance(seq, bytes):
            seq = seq.decode("utf-8", errors="replace")
        if seq.isascii() and _WORD_RE.fullmatch(seq):
            codes = seq.encode("ascii").translate(self._genslm_codes)
            return self._codon_ids(codes + _FILLERS[len(codes) % 3])
        words = " ".join(seq[i: i + 3] for i in range(0, len(seq), 3)).upper()
        return np.array(self.backend.encode(words).ids, dtype=np.uint8)

    def frame_offset(self, seq: str | bytes, reading_frame: str = "as_read") -> int:
        """Leading nucleotides (not counting whitespace) ``encode`` drops to reach the frame."""
        return self._frame_offset(self._codes(seq), reading_frame)

    def encode_flat(self, seqs, reading_frame: str = "as_read") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``encode`` of each sequence as one array, in one vectorised pass over all of them (much
        faster than one call per sequence for many short ones, e.g. the genes of a bacterial
        genome): sequence i is ``ids[starts[i]:starts[i] + counts[i]]`` (between sequences may lie
        an [UNK] left from a partial codon: skip it)."""
        pieces = [self._codes(seq, reading_frame) for seq in seqs]
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        whole = -(-lengths // 3)  # codons including a completed partial one
        if (lengths % 3).any():  # complete partial codons with invalid bases rather than copying sequences
            pieces = [part for piece, n in zip(pieces, (lengths % 3).tolist()) for part in (piece, _FILLERS[n])]
        ids = self._codon_ids(b"".join(pieces))
        return ids, np.cumsum(whole) - whole, lengths // 3

    def _codes(self, seq: str | bytes, reading_frame: str = "as_read") -> bytes:
        """One byte per nucleotide: base code 0-3 or _INVALID; whitespace removed; starting at
        the reading frame."""
        if isinstance(seq, str):
            # 'replace' keeps one byte per character, so a non-ASCII letter is one bad nucleotide.
            seq = seq.encode("ascii", errors="replace")
        codes = seq.translate(self._base_codes, _WHITESPACE)
        return codes[self._frame_offset(codes, reading_frame):] if reading_frame != "as_read" else codes

    @staticmethod
    def _frame_offset(codes: bytes, reading_frame: str) -> int:
        if reading_frame == "as_read":
            return 0
        if reading_frame != "longest_orf":
            raise ValueError(f"reading_frame {reading_frame!r}: expected one of {', '.join(READING_FRAMES)}")
        longest = []
        for offset in range(3):
            stops = np.flatnonzero(np.isin(_codon_index(codes[offset:]), _STOP_INDICES))
            n = (len(codes) - offset) // 3
            longest.append(int(np.diff(stops, prepend=-1, append=n).max()) - 1)
        return max(range(3), key=lambda offset: (longest[offset], -offset))

    def _codon_ids(self, codes: bytes) -> np.ndarray:
        # bytes.translate is a byte -> byte table lookup several times faster than numpy's take
        return np.frombuffer(bytearray(_codon_index(codes)).translate(self._code_table), dtype=np.uint8)

    def encode_with_tokenizers(self, seq: str) -> list[int]:
        """Slow reference path through the ``tokenizers`` library, same rules as ``encode``."""
        seq = _WHITESPACE_RE.sub("", seq)
        # Any odd character becomes N first: the Whitespace pre-tokenizer would otherwise split
        # 'A-G' into three words, and uppercasing non-ASCII could change the length.
        seq = _NON_NUCLEOTIDE_RE.sub("N", seq).upper().replace("U", "T")
        n = len(seq) // 3
        words = " ".join(seq[3 * i: 3 * i + 3] for i in range(n))
        return self.backend.encode(words).ids if words else []

    def decode(self, ids) -> str:
        """Token ids -> nucleotides; [UNK] -> 'NNN', other special tokens are skipped."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        keep = ~np.isin(ids, self._special_ids) | (ids == self.unk_id)
        return self._decode_table[ids[keep]].tobytes().decode("ascii")


def _codon_index(codes: bytes) -> np.ndarray:
    """(c0 * 5 + c1) * 5 + c2 of each whole codon of base codes (uint8: the largest is 124)."""
    n = len(codes) // 3
    triples = np.frombuffer(codes, dtype=np.uint8, count=3 * n).reshape(n, 3)
    index = triples[:, 0] * _CODES
    index += triples[:, 1]
    index *= _CODES
    index += triples[:, 2]
    return index
