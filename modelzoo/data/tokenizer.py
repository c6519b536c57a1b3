"""Codon tokenizer with GenSLM's 69-token vocabulary.

The vocabulary is a HuggingFace ``tokenizers`` WordLevel JSON ([UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3
[MASK]=4, then the 64 codons), so ids match GenSLM checkpoints and files.

Normalisation rules (both encoders apply them, and a test checks they give identical ids):

* ASCII whitespace anywhere in the input (spaces, tabs, CR/LF) is removed first, so the reading
  frame is counted on nucleotides only;
* letters are case-insensitive: ``acg`` is ``ACG`` (GenSLM turned lowercase into [UNK]);
* RNA ``U`` is read as ``T``;
* a codon with any other character (``N``, IUPAC codes such as ``R``/``Y``, gap ``-``, stop ``*``,
  digits, non-ASCII) becomes [UNK];
* a trailing partial codon (1 or 2 nucleotides) is dropped.

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
_SKIP = 255  # base code for whitespace, removed before codons are formed
_WHITESPACE = b" \t\n\r\v\f"
_WHITESPACE_RE = re.compile(r"[ \t\n\r\v\f]+")
_NON_NUCLEOTIDE_RE = re.compile(r"[^ACGTUacgtu]")


def _byte_table() -> np.ndarray:
    table = np.full(256, _INVALID, dtype=np.uint8)
    for code, base in enumerate(_BASES):
        table[ord(base)] = table[ord(base.lower())] = code
    table[ord("U")] = table[ord("u")] = _BASES.index("T")
    for byte in _WHITESPACE:
        table[byte] = _SKIP
    return table


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
        self._bytes = _byte_table()
        self._special_ids = np.array(sorted(set(vocab[t] for t in names.values())))
        # Token id -> 3 ASCII bytes, for decode; specials stay zero and are filtered out.
        self._decode_table = np.zeros((self.vocab_size, 3), dtype=np.uint8)
        for codon, tid in zip(codons, self._codon_table):
            self._decode_table[tid] = np.frombuffer(codon.encode(), dtype=np.uint8)
        self._decode_table[self.unk_id] = np.frombuffer(b"NNN", dtype=np.uint8)

    def encode(self, seq: str | bytes) -> np.ndarray:
        """Nucleotides -> uint8 codon ids, one per whole codon (see the module docstring)."""
        if isinstance(seq, str):
            # 'replace' keeps one byte per character, so a non-ASCII letter is one bad nucleotide.
            seq = seq.encode("ascii", errors="replace")
        codes = self._bytes[np.frombuffer(seq, dtype=np.uint8)]
        codes = codes[codes != _SKIP]
        n = len(codes) // 3
        codes = codes[: 3 * n].reshape(n, 3)
        bad = (codes == _INVALID).any(axis=1)
        index = (codes[:, 0].astype(np.intp) & 3) * 16 + (codes[:, 1] & 3) * 4 + (codes[:, 2] & 3)
        ids = self._codon_table[index]
        ids[bad] = self.unk_id
        return ids

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
