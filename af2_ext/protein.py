"""Structure output: one chain as PDB text (:func:`pdb_chain_text`, built with Biopython) and as a PDB file
(:func:`write_pdb`, written atomically), each atom checked against the format's 8-column coordinate field.

Residue and atom names come from :mod:`af2_ext.residue_constants` (the seed's 14-slot layout for K = 14 atoms per
residue). Biopython is imported when a chain is written, not with this module.
"""
from __future__ import annotations

import io
import math
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from af2_ext import residue_constants as rc
from af2_ext._backend import as_tensor, check_finite
from af2_ext.fileio import atomic_open

__all__ = ["pdb_chain_text", "write_pdb"]

_DEFAULT_ATOM_NAMES = {1: ("CA",), 3: ("N", "CA", "C"), 4: ("N", "CA", "C", "O")}
# A PDB coordinate is 8 columns written "%8.3f": it must round to within [-999.999, 9999.999]. Anything printing
# wider shifts every later column and no parser reads the line.
_PDB_COORD_FORMAT = "%8.3f"
_PDB_COORD_WIDTH = 8


def _first_unwritable_coordinate(points: np.ndarray) -> Optional[tuple]:
    """Index of the first coordinate of ``points`` (any shape) that is not finite or prints wider than a PDB
    coordinate's 8 columns, with the value and its text; None when all fit. Judged on the text itself, so the
    rounding is exactly the writer's."""
    points = np.asarray(points, dtype=np.float64)
    # Only values at or past -999.999 / 9999.999 can print wider; the rest need no formatting.
    suspects = np.argwhere(~np.isfinite(points) | (points >= 9999.999) | (points <= -999.999))
    for index in suspects:
        value = float(points[tuple(index)])
        text = _PDB_COORD_FORMAT % value
        if not math.isfinite(value) or len(text) > _PDB_COORD_WIDTH:
            return tuple(int(i) for i in index), value, text.strip()
    return None


def _pdb_range_error(where: str, value: float, text: str) -> ValueError:
    if not math.isfinite(value):
        return ValueError(f"{where} = {value!r} is not a coordinate a PDB file can hold")
    return ValueError(f"{where} = {value!r} prints as {text!r}, wider than a PDB coordinate's "
                      f"{_PDB_COORD_WIDTH} columns: coordinates must round to within [-999.999, 9999.999] Å "
                      f"(3 decimals); move or scale the structure")


def pdb_chain_text(residues: Sequence[str], atoms: Sequence[Mapping[str, np.ndarray]], *, chain_id: str = "A",
                   b_factors: Optional[Sequence[float]] = None) -> str:
    """PDB text of one chain, built with Biopython (``Bio.PDB`` StructureBuilder + PDBIO): residue ``i`` is
    ``residues[i]`` (three-letter name), numbered ``i + 1``, with the atoms ``atoms[i]`` (name -> (3,) Å).
    A ValueError names the first atom whose coordinate the format cannot hold (see :func:`write_pdb`)."""
    for i, (name3, residue) in enumerate(zip(residues, atoms)):
        for name, xyz in residue.items():
            bad = _first_unwritable_coordinate(xyz)
            if bad is not None:
                (axis,), value, text = bad
                raise _pdb_range_error(f"residue {i + 1} ({name3}), atom {name}, {'xyz'[axis]}", value, text)
    try:
        from Bio.PDB.PDBIO import PDBIO
        from Bio.PDB.StructureBuilder import StructureBuilder
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("writing PDB files needs Biopython: pip install biopython") from error

    builder = StructureBuilder()
    builder.init_structure("af2_ext")
    builder.init_model(0)
    builder.init_chain(chain_id)
    builder.init_seg("    ")
    for i, (name3, residue) in enumerate(zip(residues, atoms)):
        builder.init_residue(name3, " ", i + 1, " ")
        b_factor = 0.0 if b_factors is None else float(b_factors[i])
        for name, xyz in residue.items():
            fullname = name if len(name) == 4 else f" {name:<3}"
            builder.init_atom(name, np.array(xyz, dtype=np.float64), b_factor, 1.0, " ", fullname, element=name[0])
    pdb = PDBIO()
    pdb.set_structure(builder.get_structure())
    text = io.StringIO()
    pdb.save(text)
    return text.getvalue()


def write_pdb(path: Union[str, os.PathLike], coords, sequence: str, *, atom_names: Optional[Sequence[str]] = None,
              chain_id: str = "A", b_factors=None) -> str:
    """Write one chain to a PDB file (:func:`pdb_chain_text`), atomically (:mod:`af2_ext.fileio`).

    Args:
        path: output file.
        coords: (N, 3) Cα coordinates, or (N, K, 3) K atoms per residue: K = 3 is N, CA, C; K = 4 adds O;
            K = 14 is the seed's layout (sidechainnet 0.x's; each residue writes its own atoms, other slots are
            skipped); other K need ``atom_names``. In Å; torch or numpy. (Transpose the seed's (3, N) layout
            first.) Each value must print in the PDB format's 8 columns with 3 decimals: within [-999.999,
            9999.999] after rounding, else a ValueError names the atom.
        sequence: N one-letter codes of the 20 standard amino acids (any case).
        atom_names: K atom names, overriding the defaults above.
        chain_id: one character.
        b_factors: optional (N,) per-residue B-factor column (e.g. pLDDT), in [0, 999.99].

    Returns:
        ``str(path)``.
    """
    xyz, _ = as_tensor("coords", coords)
    xyz = xyz.detach().cpu().to(torch.float64)
    coords_dim = xyz.dim()
    if xyz.dim() == 2:
        if xyz.shape[0] == 3 and xyz.shape[1] != 3:
            raise ValueError(f"coords must be (N, 3) or (N, K, 3), got {tuple(xyz.shape)}; transpose the seed's "
                             f"(3, N) layout with .T")
        xyz = xyz.unsqueeze(1)  # [n, 1, 3]
    if xyz.dim() != 3 or xyz.shape[-1] != 3 or xyz.shape[0] == 0:
        raise ValueError(f"coords must be (N, 3) or (N, K, 3) with N >= 1, got {tuple(xyz.shape)}")
    check_finite("coords", xyz)
    n, k, _ = xyz.shape
    if not isinstance(sequence, str):
        raise TypeError(f"sequence must be a str of one-letter codes, got {type(sequence).__name__}")
    sequence = sequence.upper()
    if len(sequence) != n:
        raise ValueError(f"sequence has {len(sequence)} residues but coords has {n}")
    unknown = sorted(set(sequence) - set(rc.ONE_TO_THREE))
    if unknown:
        raise ValueError(f"sequence has unknown residue letters {unknown}; expected one of {rc.RESTYPES}")
    if atom_names is None:
        if k == rc.SEED_ATOMS_PER_RESIDUE:
            names_per_residue = [rc.BACKBONE_ATOM_NAMES + rc.SIDECHAIN_ATOM_NAMES[rc.ONE_TO_THREE[aa]]
                                 for aa in sequence]
        elif k in _DEFAULT_ATOM_NAMES:
            names_per_residue = [_DEFAULT_ATOM_NAMES[k]] * n
        else:
            raise ValueError(f"atom_names is required for {k} atoms per residue")
    else:
        if isinstance(atom_names, str) or len(atom_names) != k or not all(
                isinstance(a, str) and 1 <= len(a.strip()) <= 4 for a in atom_names):
            raise ValueError(f"atom_names must be {k} names of 1-4 characters, got {atom_names!r}")
        if len(set(atom_names)) != k:
            raise ValueError(f"atom_names must be distinct, got {atom_names!r}")
        names_per_residue = [tuple(a.strip() for a in atom_names)] * n
    if not isinstance(chain_id, str) or len(chain_id) != 1:
        raise ValueError(f"chain_id must be one character, got {chain_id!r}")
    if b_factors is None:
        bf = torch.zeros(n, dtype=torch.float64)
    else:
        if isinstance(b_factors, (list, tuple)):
            b_factors = np.asarray(b_factors, dtype=np.float64)
        bf, _ = as_tensor("b_factors", b_factors)
        bf = bf.detach().cpu().to(torch.float64).flatten()
        if bf.numel() != n:
            raise ValueError(f"b_factors must have one value per residue ({n}), got {bf.numel()}")
        check_finite("b_factors", bf)
        if bool((bf < 0).any()) or bool((bf > 999.99).any()):
            raise ValueError("b_factors must be within [0, 999.99]")

    points = xyz.numpy()
    residues = [rc.ONE_TO_THREE[letter] for letter in sequence]
    written = np.arange(k) < np.array([len(names) for names in names_per_residue])[:, None]  # [n, k]
    bad = _first_unwritable_coordinate(np.where(written[..., None], points, 0.0))  # unwritten slots don't count
    if bad is not None:
        (i, atom, axis), value, text = bad
        index = f"[{i}, {axis}]" if coords_dim == 2 else f"[{i}, {atom}, {axis}]"
        where = f"coords{index} (residue {i + 1} ({residues[i]}), atom {names_per_residue[i][atom]}, {'xyz'[axis]})"
        raise _pdb_range_error(where, value, text)
    atoms = [dict(zip(names_per_residue[i], points[i])) for i in range(n)]
    text = pdb_chain_text(residues, atoms, chain_id=chain_id, b_factors=bf.tolist())
    path = os.fspath(path)
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return path

