"""Sequences and alignments in: one-letter codes -> the model's tokens, FASTA and MSA (aligned FASTA / A3M) files.

Tokens are :mod:`af2_ext.residue_constants`' vocabulary: 0..19 the amino acids in ``RESTYPES`` order, 20
(``UNKNOWN_TOKEN``) anything else: X, the ambiguity codes B Z J U O, MSA gaps (``GAP_TOKEN``, the model has no
separate gap token) and padding.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from af2_ext.app.structure import read_text
from af2_ext.fileio import PathLike, check_input_file
from af2_ext.residue_constants import GAP_LETTER, GAP_TOKEN, RESTYPE_ORDER, RESTYPES, UNKNOWN_LETTERS, UNKNOWN_TOKEN

__all__ = ["UNKNOWN_TOKEN", "GAP_TOKEN", "UNKNOWN_LETTERS", "check_letters", "tokenize", "sequence_tokens",
           "read_fasta", "read_msa"]

_TOKEN_TABLE = np.full(256, UNKNOWN_TOKEN, dtype=np.int64)  # ASCII code -> token
_TOKEN_TABLE[np.frombuffer(RESTYPES.encode("ascii"), np.uint8)] = np.arange(len(RESTYPES))
_LETTERS = frozenset(RESTYPES + UNKNOWN_LETTERS)
_ALLOWED = f"the 20 amino-acid one-letter codes {RESTYPES}, or {'/'.join(UNKNOWN_LETTERS)} for unknown"


def check_letters(sequence: str, where: str, extra: str = "") -> str:
    """Upper-cased ``sequence``; a ValueError naming ``where`` and the first bad letter otherwise (letters: the 20
    amino acids, the unknown letters and ``extra``)."""
    sequence = sequence.upper()
    for position, letter in enumerate(sequence, start=1):
        if letter not in _LETTERS and letter not in extra:
            bad = sorted(set(sequence) - _LETTERS - set(extra))
            raise ValueError(f"{where}: invalid character {letter!r} at position {position} (all invalid: "
                             f"{''.join(bad)!r}); expected {_ALLOWED}{extra and f', or {extra!r}'}")
    return sequence


def sequence_tokens(sequence: str) -> np.ndarray:
    """(n,) int64 tokens of a sequence as a dataset stores it: any letter beyond the 20 amino acids (any case) is
    ``UNKNOWN_TOKEN``, without complaint (what sidechainnet's vocabulary does with unknown letters)."""
    return _TOKEN_TABLE[np.frombuffer(sequence.upper().encode("ascii", "replace"), np.uint8)]


def tokenize(sequence: str) -> torch.Tensor:
    """One-letter sequence (any case) -> (n,) int64 tokens: ``RESTYPES`` index, 20 for X/B/Z/J/U/O; a ValueError
    naming any other character."""
    if not isinstance(sequence, str):
        raise TypeError(f"sequence must be a str of one-letter codes, got {type(sequence).__name__}")
    if not sequence:
        raise ValueError("sequence is empty")
    return torch.from_numpy(sequence_tokens(check_letters(sequence, "sequence")))


def _read_records(path: PathLike, kind: str) -> list[tuple[str, str, int]]:
    """(name, raw sequence text, header line) of each '>' record of a FASTA-like file (``.gz`` too)."""
    path = check_input_file(path, f"{kind} file")
    lines = read_text(path, kind).splitlines()
    records: list[tuple[str, list[str], int]] = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith(";") or line.startswith("#"):
            continue
        if line.startswith(">"):
            name = line[1:].split()[0] if line[1:].split() else f"record{len(records) + 1}"
            records.append((name, [], number))
        elif not records:
            raise ValueError(f"{kind} file {path!r}, line {number}: sequence data before the first '>' header")
        else:
            records[-1][1].append("".join(line.split()))
    if not records:
        raise ValueError(f"{kind} file {path!r} is empty (no '>' record)")
    return [(name, "".join(parts), number) for name, parts, number in records]


def read_fasta(path: PathLike) -> list[tuple[str, str]]:
    """Records of a FASTA file as ``(name, sequence)``: the name is the header's first word, the sequence
    upper-cased (a trailing ``*`` is dropped). Errors name the file and the record."""
    out = []
    for name, text, line in _read_records(path, "FASTA"):
        text = text[:-1] if text.endswith("*") else text
        where = f"FASTA file {os.fspath(path)!r}, record {name!r} (line {line})"
        if not text:
            raise ValueError(f"{where}: empty sequence")
        out.append((name, check_letters(text, where)))
    return out


def read_msa(path: PathLike, *, format: str = "auto") -> torch.Tensor:
    """An alignment as (M, N) int64 tokens, the first record first (put the query there).

    Args:
        path: aligned FASTA (every row the same length; ``-`` or ``.`` gaps) or A3M (upper case and ``-`` are
            match columns, lower case and ``.`` are insertions and are removed).
        format: "fasta", "a3m" or "auto": A3M for a ``.a3m`` file or when the rows only line up once lower
            case is removed, else aligned FASTA.

    Gaps become token 20 (``GAP_TOKEN``), the same token as an unknown residue: the model has no other.
    """
    if format not in ("auto", "fasta", "a3m"):
        raise ValueError(f"format must be 'auto', 'fasta' or 'a3m', got {format!r}")
    path = os.fspath(path)
    records = _read_records(path, "MSA")
    if format == "auto":
        lengths = {len(text) for _, text, _ in records}
        match_lengths = {len(re.sub(r"[a-z.]", "", text)) for _, text, _ in records}
        is_a3m = path.lower().endswith((".a3m", ".a3m.gz")) or (len(lengths) > 1 and len(match_lengths) == 1)
        format = "a3m" if is_a3m else "fasta"
    rows = []
    for name, text, line in records:
        text = re.sub(r"[a-z.]", "", text) if format == "a3m" else text.upper().replace(".", GAP_LETTER)
        where = f"MSA file {path!r}, record {name!r} (line {line})"
        if not text:
            raise ValueError(f"{where}: empty row")
        text = check_letters(text, where, extra=GAP_LETTER)
        if rows and len(text) != len(rows[0]):
            raise ValueError(f"{where}: {len(text)} aligned columns, but the first row has {len(rows[0])} "
                             f"(read as {format}; A3M insertions must be lower case)")
        rows.append(text)
    tokens = [[GAP_TOKEN if c == GAP_LETTER else RESTYPE_ORDER.get(c, UNKNOWN_TOKEN) for c in row] for row in rows]
    return torch.tensor(tokens, dtype=torch.long)
