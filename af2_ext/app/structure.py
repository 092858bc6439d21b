"""Structure files: the one PDB / mmCIF reader of the application (the dataset builder and ``fold --reference``
read through it) and the Cα-trace writer.

Reading (:func:`read_structure`, Biopython): the protein chains of the first model, each residue with its
one-letter code (:func:`residue_letter`), its file name and its heavy atoms (the first alternate location in the
file; Bio would pick the highest occupancy) or None when it is not observed. Amino acids only: ATOM records,
plus HETATM amino acids (MSE, SEP, ...) peptide-bonded to a neighbour; waters and ligands are dropped. Unobserved
residues come from mmCIF ``_pdbx_poly_seq_scheme`` or PDB ``REMARK 465``; without either, a numbering gap at a
chain break becomes unknown residues (``UNK``) when the chain can span it.

Parsed with Bio.PDB rather than ProDy: one Structure/Model/Chain/Residue API for PDB and mmCIF, text in (so .gz
is just gzip), explicit hetero flags, and alternate locations resolved here (ProDy keeps only altloc 'A').
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import math
import os
import warnings
from typing import IO, Mapping, Optional, Sequence

import numpy as np
import torch

from af2_ext import residue_constants as rc
from af2_ext import utils
from af2_ext.fileio import PathLike, atomic_open

__all__ = ["STRUCTURE_SUFFIXES", "Residue", "Chain", "Structure", "open_text", "read_text", "residue_letter",
           "read_structure", "pdb_text", "write_ca_trace"]

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
_MAX_PEPTIDE_BOND = 2.0  # a HETATM amino acid counts as part of the chain when peptide-bonded to a neighbour
_MAX_CA_STEP = 3.9  # Å per residue: a numbering gap is filled only if the chain can span it
_HYDROGENS = ("H", "D")


# ----------------------------------------------------------------------------------------------------------
# Text files
# ----------------------------------------------------------------------------------------------------------


def _gzipped(path: str) -> bool:
    return path.lower().endswith(".gz")


def open_text(path: PathLike) -> IO[str]:
    """A text handle on ``path``: gzip-compressed when named ``.gz``, UTF-8 (a byte-order mark is dropped).
    Reading raises UnicodeDecodeError, gzip.BadGzipFile or EOFError on a file that is not such text."""
    path = os.fspath(path)
    return gzip.open(path, "rt", encoding="utf-8-sig") if _gzipped(path) else open(path, encoding="utf-8-sig")


def read_text(path: PathLike, kind: str) -> str:
    """The whole text of ``path`` (:func:`open_text`); a ValueError naming it as ``kind`` ("FASTA", ...) when it
    is not readable text."""
    try:
        with open_text(path) as handle:
            return handle.read()
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as error:
        raise ValueError(f"{kind} file {os.fspath(path)!r} is not a text file ({type(error).__name__}: {error})") \
            from error


# ----------------------------------------------------------------------------------------------------------
# Residue names
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _modified_parents() -> Mapping[str, str]:
    """Residue name -> parent one-letter code of the modified amino acids Biopython knows (the wwPDB CCD's
    parents: MSE -> M, SEP -> S, ...), and the force-field names of standard residues."""
    from Bio.Data.PDBData import protein_letters_3to1_extended

    parents = {name: letter for name, letter in protein_letters_3to1_extended.items() if letter in rc.RESTYPE_ORDER}
    parents.update((name, rc.THREE_TO_ONE[three]) for name, three in rc.FORCE_FIELD_RESIDUES.items())
    for name in rc.THREE_TO_ONE:
        parents.pop(name, None)
    return parents


def residue_letter(resname: str) -> tuple[Optional[str], bool]:
    """(one-letter code, modified) of a residue name: a standard residue is its letter; a modified one (MSE,
    SEP, ... and force-field names such as HSD) its parent's, with ``modified`` True; an amino acid with no
    parent among the 20 (``UNK``, selenocysteine ``SEC``, pyrrolysine ``PYL``) is ``X``. Anything else (water,
    ligands, nucleotides) is (None, False)."""
    resname = resname.strip().upper()
    if resname in rc.THREE_TO_ONE:
        return rc.THREE_TO_ONE[resname], False
    parent = _modified_parents().get(resname)
    if parent is not None:
        return parent, True
    if resname in rc.UNKNOWN_RESIDUE_NAMES:
        return "X", False
    return None, False


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Residue:
    """One amino acid of a chain: ``name`` as in the file (upper case), ``letter`` and ``modified`` from
    :func:`residue_letter`, ``atoms`` heavy atom name -> (3,) float32 Å, None when not observed."""

    name: str
    letter: str
    modified: bool
    atoms: Optional[dict]


@dataclasses.dataclass
class Chain:
    """A protein chain in sequence order; ``id`` is the author chain id ("A" for a blank one)."""

    id: str
    residues: list

    @property
    def sequence(self) -> str:
        return "".join(r.letter for r in self.residues)

    @property
    def observed(self) -> list:
        """The residues with coordinates in the file."""
        return [r for r in self.residues if r.atoms is not None]


@dataclasses.dataclass
class Structure:
    """The protein chains of a structure file's first model; ``pdb_id`` from the header (else the file name),
    ``model`` the model's serial number, ``resolution`` in Å (None when the header has none)."""

    source: str
    pdb_id: str
    model: int
    resolution: Optional[float]
    chains: list


def _first_altloc(entity):
    """Bio selects the highest-occupancy alternate; we keep the first one in the file."""
    from Bio.PDB.Entity import DisorderedEntityWrapper

    if isinstance(entity, DisorderedEntityWrapper):
        return next(iter(entity.child_dict.values()))
    return entity


def _residue_atoms(residue) -> dict:
    atoms = {}
    for atom in residue:
        atom = _first_altloc(atom)
        if atom.element not in _HYDROGENS:
            atoms.setdefault(atom.get_id(), atom.get_coord())
    return atoms


def _distance(atoms_a: Optional[dict], name_a: str, atoms_b: Optional[dict], name_b: str) -> float:
    if not atoms_a or not atoms_b or name_a not in atoms_a or name_b not in atoms_b:
        return math.inf
    return float(np.linalg.norm(atoms_a[name_a] - atoms_b[name_b]))


def _residue_key(resseq, icode: Optional[str]) -> tuple:
    return int(resseq), (icode or " ").strip() or " "


def _amino_acids(chain) -> list:
    """(key, resname, atoms) of a chain's amino-acid residues, in file order: ATOM records plus HETATM amino
    acids (MSE, SEP, ...) peptide-bonded to a neighbour; waters and ligands are dropped."""
    candidates = []
    for residue in chain:
        residue = _first_altloc(residue)
        hetflag, resseq, icode = residue.get_id()
        if hetflag != "W" and residue_letter(residue.get_resname())[0] is not None:
            candidates.append((hetflag, (_residue_key(resseq, icode), residue.get_resname(),
                                         _residue_atoms(residue))))
    kept = []
    for k, (hetflag, entry) in enumerate(candidates):
        bonded = ((k > 0 and _distance(candidates[k - 1][1][2], "C", entry[2], "N") <= _MAX_PEPTIDE_BOND)
                  or (k + 1 < len(candidates)
                      and _distance(entry[2], "C", candidates[k + 1][1][2], "N") <= _MAX_PEPTIDE_BOND))
        if hetflag == " " or bonded:
            kept.append(entry)
    return kept


def _merge_unobserved(observed: list, missing: list) -> list:
    """(resname, atoms or None) in chain order: observed residues in file order with unobserved ones (REMARK 465)
    placed by residue number; an unobserved residue whose number is observed too is dropped."""
    seen = {key for key, _, _ in observed}
    missing = sorted((m for m in missing if m[0] not in seen), key=lambda m: m[0])
    out, j = [], 0
    for key, resname, atoms in observed:
        while j < len(missing) and missing[j][0] < key:
            out.append((missing[j][1], None))
            j += 1
        out.append((resname, atoms))
    out.extend((resname, None) for _, resname in missing[j:])
    return out


def _fill_numbering_gaps(observed: list) -> list:
    """(resname, atoms or None) for a chain without a missing-residue record: a jump in residue numbers across a
    chain break becomes that many unknown residues, when the Cα distance allows it."""
    out = []
    for k, (key, resname, atoms) in enumerate(observed):
        if k > 0:
            prev_key, _, prev_atoms = observed[k - 1]
            jump = key[0] - prev_key[0]
            if (jump > 1 and key[1] == prev_key[1] == " "
                    and _distance(prev_atoms, "C", atoms, "N") > _MAX_PEPTIDE_BOND
                    and _distance(prev_atoms, "CA", atoms, "CA") <= _MAX_CA_STEP * jump):
                out.extend(("UNK", None) for _ in range(jump - 1))
        out.append((resname, atoms))
    return out


def _chain(chain_id: str, residues: Sequence[tuple]) -> Chain:
    out = []
    for resname, atoms in residues:
        resname = resname.strip().upper()
        letter, modified = residue_letter(resname)
        if letter is not None:  # else an unobserved cap or other monomer that is not an amino acid
            out.append(Residue(resname, letter, modified, atoms))
    return Chain(chain_id, out)


def _is_mmcif(path: str) -> bool:
    stem = (path[:-3] if _gzipped(path) else path).lower()
    if stem.endswith((".cif", ".mmcif")):
        return True
    if stem.endswith((".pdb", ".ent")):
        return False
    with open_text(path) as f:
        for line in f:
            if line.strip():
                return line.startswith("data_")
    return False


def _pdb_id(header: Mapping, path: str) -> str:
    """The header's id code, else the file name (``pdb1abc.ent`` -> ``1ABC``, the wwPDB naming)."""
    idcode = str(header.get("idcode") or "").strip().upper()
    if idcode and idcode not in ("?", "."):
        return idcode
    name = os.path.basename(path)
    for suffix in (".gz",) + STRUCTURE_SUFFIXES:
        name = name[:-len(suffix)] if name.lower().endswith(suffix) else name
    if len(name) == 7 and name.lower().startswith("pdb") and name[3].isdigit():
        name = name[3:]
    return name.upper().replace("_", "-")  # '_' separates the fields of a sidechainnet id


def _resolution(header: Mapping) -> Optional[float]:
    try:
        value = float(header.get("resolution"))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _column(mmcif: Mapping, key: str) -> list:
    value = mmcif.get(key, [])
    return [value] if isinstance(value, str) else list(value)


def _mmcif_polymer_residues(mmcif: Mapping) -> Optional[dict]:
    """Auth chain id -> [(key, monomer)] of every polypeptide residue in sequence order (_pdbx_poly_seq_scheme),
    observed or not; None when the file has no scheme."""
    strands = _column(mmcif, "_pdbx_poly_seq_scheme.pdb_strand_id")
    if not strands:
        return None
    entity_types = dict(zip(_column(mmcif, "_entity_poly.entity_id"), _column(mmcif, "_entity_poly.type")))
    columns = [_column(mmcif, f"_pdbx_poly_seq_scheme.{name}") for name in ("entity_id", "seq_id", "mon_id",
                                                                            "pdb_seq_num")]
    if any(len(column) != len(strands) for column in columns):
        return None  # an incomplete scheme: read as if there were none
    icodes = _column(mmcif, "_pdbx_poly_seq_scheme.pdb_ins_code") or ["."] * len(strands)  # optional item
    rows = zip(strands, *columns, icodes)
    out: dict = {}
    seen = set()
    for strand, entity, seq_id, mon_id, pdb_num, icode in rows:
        polymer_type = entity_types.get(entity, "polypeptide").strip("'\"").lower()
        if not polymer_type.startswith("polypeptide") or (strand, seq_id) in seen:
            continue  # a nucleic acid, or a second monomer at one position (microheterogeneity): keep the first
        seen.add((strand, seq_id))
        out.setdefault(strand, []).append((_residue_key(pdb_num, None if icode in (".", "?") else icode), mon_id))
    return out


def _check_pdb_chain_ids(text: str) -> None:
    """Bio reads one chain character (column 22); files writing two (columns 21-22) would merge chains."""
    for line in text.splitlines():
        if (line.startswith(("ATOM  ", "HETATM")) and line[20:21].strip()
                and residue_letter(line[17:20])[0] is not None):
            raise ValueError("two-character chain ids (PDB columns 21-22) are not standard PDB; use mmCIF")


def read_structure(path: PathLike, chains: Optional[set] = None) -> Structure:
    """The protein chains of the first model of a PDB or mmCIF file (``.gz`` too; mmCIF by its name, else by a
    first line ``data_``), see the module docstring. ``chains``: keep only these chain ids. Chains with no
    observed amino acid are left out, so ``Structure.chains`` may be empty.

    Raises ValueError for a file without atoms or with two-character PDB chain ids, and whatever reading or
    Biopython raises on a file that is not a structure (UnicodeDecodeError, ...): each caller says it its way.
    """
    from Bio.PDB import MMCIFParser, PDBParser
    from Bio.PDB.MMCIF2Dict import MMCIF2Dict

    path = os.fspath(path)
    with open_text(path) as f:
        text = f.read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Bio's PDBConstructionWarning for every oddity in real files
        if _is_mmcif(path):
            scheme = _mmcif_polymer_residues(MMCIF2Dict(io.StringIO(text)))
            structure = MMCIFParser(QUIET=True).get_structure("x", io.StringIO(text))
        else:
            _check_pdb_chain_ids(text)
            scheme = None
            structure = PDBParser(QUIET=True).get_structure("x", io.StringIO(text))
    models = list(structure)
    if not models:
        raise ValueError("no atoms: not a PDB or mmCIF structure")
    model = models[0]  # NMR: the first model
    header = structure.header
    missing: dict = {}
    for m in header.get("missing_residues", []) or []:  # PDB REMARK 465
        if m.get("model") in (None, model.serial_num):
            missing.setdefault(m["chain"], []).append((_residue_key(m["ssseq"], m.get("insertion")), m["res_name"]))
    out = []
    for chain in model:
        chain_id = chain.get_id().strip() or "A"
        if chains is not None and chain_id not in chains:
            continue
        observed = _amino_acids(chain)
        if scheme is not None:
            by_key = {key: (resname, atoms) for key, resname, atoms in observed}
            residues = [by_key.get(key, (mon_id, None)) for key, mon_id in scheme.get(chain.get_id(), [])]
            if not any(atoms is not None for _, atoms in residues):
                continue  # not a polypeptide, or nothing observed
        elif not observed:
            continue  # waters, ligands or nucleic acids only
        elif header.get("has_missing_residues"):
            residues = _merge_unobserved(observed, missing.get(chain.get_id(), []))
        else:
            residues = _fill_numbering_gaps(observed)
        out.append(_chain(chain_id, residues))
    return Structure(path, _pdb_id(header, path), model.serial_num or 1, _resolution(header), out)


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def pdb_text(sequence: str, atoms: Sequence[Mapping[str, np.ndarray]], chain_id: str = "A") -> str:
    """:func:`af2_ext.utils.pdb_chain_text` of one chain; letters beyond the 20 amino acids are written as UNK
    (``utils.write_pdb`` takes the 20 standard residues only)."""
    residues = [rc.ONE_TO_THREE.get(letter, "UNK") for letter in sequence]
    return utils.pdb_chain_text(residues, atoms, chain_id=chain_id)


def write_ca_trace(path: PathLike, sequence: str, ca) -> str:
    """Write a Cα trace ((n, 3) Å, one row per residue of ``sequence``) as a PDB file (atomically)."""
    coords = torch.as_tensor(ca).double().cpu().numpy()
    if coords.shape != (len(sequence), 3):
        raise ValueError(f"ca must be ({len(sequence)}, 3) for a sequence of {len(sequence)}, got {coords.shape}")
    with atomic_open(path) as handle:
        handle.write(pdb_text(sequence, [{"CA": xyz} for xyz in coords]))
    return os.fspath(path)
