"""``af2-ext build-dataset``: local PDB / mmCIF files -> a sidechainnet-format dataset (see :mod:`af2_ext.app.data`
for the format).

Each file is read by :func:`af2_ext.app.structure.read_structure`; each protein chain becomes one entry with its
heavy atoms in sidechainnet 1.0's 15 slots (``ATOM_MAP_HEAVY``), its angles measured as sidechainnet measures them
(:func:`_measure_angles`), and a split chosen so that near-identical chains stay together (:func:`_assign_splits`).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import sys
import warnings
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from af2_ext import residue_constants as rc
from af2_ext._checks import check_int
from af2_ext.app.data import MIN_LEN, NUM_ATOMS, import_sidechainnet, split_names, write_scn_dataset
from af2_ext.app.structure import STRUCTURE_SUFFIXES, Chain, read_structure
from af2_ext.fileio import check_output_dir

__all__ = ["VALID_SPLIT", "build_scn_dataset", "add_build_dataset_arguments", "run_build_dataset"]

# Where build_scn_dataset puts held-out chains. Only near-identical sequences are kept out of train, weaker than
# any of ProteinNet's validation thresholds, so the loosest label; split="valid" reads every valid-* split.
VALID_SPLIT = "valid-90"
_SPLIT_FIELDS = ("seq", "ang", "ids", "evo", "msk", "crd", "sec", "res", "ums", "mod")  # organize.EMPTY_SPLIT_DICT
# ProDy's bond test in calcPhi/calcPsi/calcOmega, which sidechainnet's angle measurement uses.
_MAX_C_N_BOND = 4.1
# Atom names that differ from sidechainnet's: selenomethionine's Se, CHARMM's Ile CD and terminal oxygens.
_ATOM_ALIASES = {"MSE": {"SE": "SD"}, "ILE": {"CD": "CD1"}}
_TERMINAL_ALIASES = {"OT1": "O", "OT2": "OXT"}


# ----------------------------------------------------------------------------------------------------------
# sidechainnet tables (imported lazily: sidechainnet pulls in openmm and prody)
# ----------------------------------------------------------------------------------------------------------


class _ScnTables(NamedTuple):
    atom_names: dict  # one-letter code -> the 15 slot names, "PAD" for unused slots
    torsions: dict  # one-letter code -> slot quadruples of side-chain torsions after the C-N-CA-CB one
    c_n_bond: float
    valid_splits: tuple


@functools.lru_cache(maxsize=None)
def _scn_tables() -> _ScnTables:
    build_info = import_sidechainnet("sidechainnet.structure.build_info")
    ATOM_MAP_HEAVY, SC_HBUILD_INFO = build_info.ATOM_MAP_HEAVY, build_info.SC_HBUILD_INFO
    NUM_COORDS_PER_RES, BB_BUILD_INFO = build_info.NUM_COORDS_PER_RES, build_info.BB_BUILD_INFO
    VALID_SPLITS = import_sidechainnet("sidechainnet.utils.download").VALID_SPLITS
    if NUM_COORDS_PER_RES != NUM_ATOMS:
        raise RuntimeError(f"sidechainnet stores {NUM_COORDS_PER_RES} atoms per residue; af2_ext reads the "
                           f"{NUM_ATOMS}-atom layout of sidechainnet 1.0.x")
    atom_names = {aa: tuple(names) for aa, names in ATOM_MAP_HEAVY.items() if aa in rc.RESTYPE_ORDER}
    atom_names["X"] = ("N", "CA", "C", "O", "OXT") + ("PAD",) * (NUM_ATOMS - 5)
    torsions = {"X": ()}
    for aa, names in atom_names.items():
        if aa == "X":
            continue
        info = SC_HBUILD_INFO[rc.ONE_TO_THREE[aa]]
        quads = []
        # measure.compute_sidechain_dihedrals: after the CB torsion, the variable ('p') torsions up to the first
        # fixed one.
        for name, value in zip(info["torsion-names"][1:], info["torsion-vals"][1:]):
            if value != "p":
                break
            quads.append(tuple(names.index(a) for a in name.split("-")))
        torsions[aa] = tuple(quads)
    return _ScnTables(atom_names, torsions, float(BB_BUILD_INFO["BONDLENS"]["c-n"]), tuple(VALID_SPLITS))


# ----------------------------------------------------------------------------------------------------------
# Structure chains -> sidechainnet entries
# ----------------------------------------------------------------------------------------------------------
# sidechainnet's own ProDy route, measure.get_seq_coords_and_angles, drops unobserved residues and raises on
# unknown ones, so it is not used; _measure_angles reproduces its angles (checked against it in the tests).


@dataclasses.dataclass
class _Chain:
    id: str
    seq: str
    crd: np.ndarray  # float32 (L, 15, 3), NaN where missing
    msk: str
    ums: str
    mod: np.ndarray  # int8 (L,)
    res: Optional[float]
    source: str


def _residue_coords(letter: str, resname: str, atoms: dict) -> np.ndarray:
    names = _scn_tables().atom_names[letter]
    alias = {**_TERMINAL_ALIASES, **_ATOM_ALIASES.get(rc.ONE_TO_THREE.get(letter), {}),
             **_ATOM_ALIASES.get(resname, {})}
    xyz = np.full((NUM_ATOMS, 3), np.nan, np.float32)
    for name, coord in atoms.items():
        name = alias.get(name, name)
        if name in names:
            xyz[names.index(name)] = coord
    if not np.isfinite(xyz[:3]).all():
        xyz[:] = np.nan  # msk '-': a residue without N, CA and C counts as unresolved
    return xyz


def _chain_record(chain: Chain, pdb_id: str, model: int, res: Optional[float], source: str) -> _Chain:
    """A structure chain as a sidechainnet entry, id ``<PDB id>_<model>_<chain>``."""
    crd = np.stack([np.full((NUM_ATOMS, 3), np.nan, np.float32) if r.atoms is None
                    else _residue_coords(r.letter, r.name, r.atoms) for r in chain.residues])
    msk = "".join("+" if np.isfinite(x[1]).all() else "-" for x in crd)
    return _Chain(f"{pdb_id}_{model}_{chain.id}", chain.sequence, crd, msk, " ".join(r.name for r in chain.residues),
                  np.asarray([r.modified for r in chain.residues], np.int8), res, source)


def _read_chains(path: str, chains: Optional[set]) -> list:
    """The protein chains of one structure file as sidechainnet entries; raises on a file that is not a structure
    or holds no protein chain."""
    structure = read_structure(path, chains)
    if not structure.chains:
        raise ValueError("no protein chains" + (f" among chains {sorted(chains)}" if chains else ""))
    return [_chain_record(chain, structure.pdb_id, structure.model, structure.resolution, path)
            for chain in structure.chains]


# ----------------------------------------------------------------------------------------------------------
# Angles (sidechainnet's definitions, measure.py, on the 15-atom arrays)
# ----------------------------------------------------------------------------------------------------------


def _dihedral(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray) -> np.ndarray:
    b0, b1, b2 = p1 - p0, p2 - p1, p3 - p2
    n0, n1 = np.cross(b0, b1), np.cross(b1, b2)
    y = np.linalg.norm(b1, axis=-1) * np.einsum("...i,...i->...", b0, n1)
    x = np.einsum("...i,...i->...", n0, n1)
    return np.arctan2(y, x)


def _bond_angle(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    u, v = a - b, c - b
    return np.arctan2(np.linalg.norm(np.cross(u, v), axis=-1), np.einsum("...i,...i->...", u, v))


def _measure_angles(seq: str, crd: np.ndarray) -> np.ndarray:
    """(L, 12) float32: phi, psi, omega, N-CA-C, CA-C-N, C-N-CA, six side-chain torsions, as sidechainnet's
    measure.get_seq_coords_and_angles defines them; NaN across chain breaks (C-N over ProDy's 4.1 Å) and where
    atoms are missing."""
    tables = _scn_tables()
    length = len(seq)
    crd = crd.astype(np.float64)
    n, ca, c, o = crd[:, 0], crd[:, 1], crd[:, 2], crd[:, 3]
    ang = np.full((length, 12), np.nan)
    with np.errstate(invalid="ignore"):
        bonded = np.linalg.norm(n[1:] - c[:-1], axis=-1) <= _MAX_C_N_BOND  # [L-1] residue i -> i+1
        gap = np.where(bonded, 0.0, np.nan)
        ang[1:, 0] = _dihedral(c[:-1], n[1:], ca[1:], c[1:]) + gap
        ang[:-1, 1] = _dihedral(n[:-1], ca[:-1], c[:-1], n[1:]) + gap
        ang[-1, 1] = _dihedral(n[-1], ca[-1], c[-1], o[-1])  # last residue: the N-CA-C-O torsion
        ang[:-1, 2] = _dihedral(ca[:-1], c[:-1], n[1:], ca[1:]) + gap
        ang[:, 3] = _bond_angle(n, ca, c)
        ang[:-1, 4] = _bond_angle(ca[:-1], c[:-1], n[1:]) + gap
        ang[:-1, 5] = _bond_angle(c[:-1], n[1:], ca[1:]) + gap
        # C-N-CA-CB with the previous C, or for a chain start sidechainnet's fictitious atom in the N-CA-C plane.
        away = -((ca - n) + (c - n))
        fictitious = n + away * tables.c_n_bond / np.linalg.norm(away, axis=-1, keepdims=True)
        prev_c = np.concatenate([np.full((1, 3), np.nan), c[:-1]])
        prev_c = np.where(np.isfinite(prev_c).all(-1, keepdims=True), prev_c, fictitious)
        ang[:, 6] = _dihedral(prev_c, n, ca, crd[:, 5])  # slot 5 is CB for every residue type but glycine
        letters = np.frombuffer(seq.encode("ascii"), np.uint8)
        for aa in set(seq):
            rows = np.flatnonzero(letters == ord(aa))
            for k, quad in enumerate(tables.torsions.get(aa, ())):
                ang[rows, 7 + k] = _dihedral(*(crd[rows, s] for s in quad))
    return ang.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Building a dataset
# ----------------------------------------------------------------------------------------------------------


def _expand_paths(paths: Iterable) -> list:
    out = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            for root, _, files in sorted(os.walk(path)):
                for name in sorted(files):
                    base = name[:-3] if name.lower().endswith(".gz") else name
                    if base.lower().endswith(STRUCTURE_SUFFIXES):
                        out.append(os.path.join(root, name))
        else:
            out.append(path)
    return out


def _sequence_groups(seqs: Sequence[str], k: int = 8, shared: float = 0.5) -> list:
    """Group label per sequence. Two sequences go together when they are identical, one contains the other, or
    they share at least ``shared`` of the shorter one's distinct k-mers (without X): the same protein observed
    over other ranges, with other gaps, or with a point mutation. Groups are closed transitively and labelled by
    their longest member (ties: the first in sorted order)."""
    distinct = sorted(set(seqs), key=lambda s: (-len(s), s))
    parent = list(range(len(distinct)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    postings: dict = {}  # k-mer -> indices of the earlier (longer or equal) sequences holding it
    for i, s in enumerate(distinct):
        kmers = {s[p:p + k] for p in range(len(s) - k + 1) if "X" not in s[p:p + k]}
        if kmers:
            counts: dict = {}
            for m in kmers:
                for j in postings.get(m, ()):
                    counts[j] = counts.get(j, 0) + 1
            partners = [j for j, n in counts.items() if n >= shared * len(kmers)]
        else:  # too short (or too unknown) for k-mers: containment only
            partners = [j for j in range(i) if s in distinct[j]]
        for j in partners:
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)
        for m in kmers:
            postings.setdefault(m, []).append(i)
    label = {s: distinct[root(i)] for i, s in enumerate(distinct)}
    return [label[s] for s in seqs]


def _assign_splits(groups: Sequence[str], valid_fraction: float, test_fraction: float, seed: int) -> list:
    """Split name per chain, whole groups (``_sequence_groups``) at a time. Groups are taken in a permutation of
    their sorted labels seeded by ``seed`` (so the input order does not matter): into test until it holds
    round(test_fraction * chains) chains (at least 1 when the fraction is > 0), then valid likewise, the rest
    into train, which always keeps at least one group."""
    members: dict = {}
    for k, group in enumerate(groups):
        members.setdefault(group, []).append(k)
    labels = sorted(members)
    targets = [[name, max(round(fraction * len(groups)), 1) if fraction > 0 else 0]
               for name, fraction in (("test", test_fraction), (VALID_SPLIT, valid_fraction))]
    splits = ["train"] * len(groups)
    remaining = len(labels)
    for g in np.random.default_rng([seed]).permutation(len(labels)):
        for target in targets:
            if target[1] > 0 and remaining > 1:
                target[1] -= len(members[labels[g]])
                for k in members[labels[g]]:
                    splits[k] = target[0]
                break
        remaining -= 1
    return splits


def build_scn_dataset(paths: Iterable[Union[str, os.PathLike]], output: Optional[Union[str, os.PathLike]] = None,
                      *, valid_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                      min_len: int = MIN_LEN, chains: Optional[Iterable[str]] = None,
                      unique_sequences: bool = False, progress: bool = False,
                      description: Optional[str] = None) -> dict:
    """A sidechainnet-format dataset from local PDB / mmCIF files (``.gz`` too; directories are searched).

    One entry per protein chain of the first model, id ``<PDB id>_<model>_<chain>`` (PDB id from the header, else
    the file name), read by :func:`af2_ext.app.structure.read_structure`. Amino acids only: modified residues
    become their parent (MSE -> MET, listed in ``mod`` and ``ums``), amino acids without one (UNK, SEC, PYL) are
    ``X`` (:func:`~af2_ext.app.structure.residue_letter`); waters and ligands are dropped; the first alternate
    location is kept. Unobserved residues (mmCIF ``_pdbx_poly_seq_scheme``, PDB ``REMARK 465``) are in ``seq`` with
    ``msk`` "-"; without that record a numbering gap at a chain break becomes unknown residues (``X``, "-").
    ``ang`` is measured from the coordinates (sidechainnet's definitions), ``evo`` is zeros (no MSA offline),
    ``sec`` blanks (no DSSP), ``res`` the header's resolution or None. Splits: see ``_assign_splits``; held-out
    chains go to ``VALID_SPLIT``.

    Files that are not structures, chains with fewer than ``min_len`` resolved residues and duplicate ids are
    skipped (warnings for files; every reason in ``data["settings"]["af2_ext"]["skipped"]``); nothing usable at
    all raises ValueError. ``chains`` keeps only those chain ids; ``unique_sequences`` keeps the first chain of
    each group of near-identical sequences (``_sequence_groups``). ``output`` is written atomically (temporary
    file + os.replace).
    """
    organize = import_sidechainnet("sidechainnet.utils.organize")

    for name, fraction in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}")
    if valid_fraction + test_fraction >= 1:
        raise ValueError(f"valid_fraction + test_fraction must be < 1, got {valid_fraction + test_fraction}")
    seed = check_int("seed", seed, minimum=0)
    min_len = check_int("min_len", min_len, minimum=1)
    chain_filter = None if chains is None else {str(c) for c in chains}
    files = _expand_paths(paths)
    if not files:
        raise ValueError("no input files")

    candidates: list = []
    skipped: list = []
    by_id: dict = {}
    for path in tqdm(files, desc="structures", unit="file", disable=not progress, file=sys.stderr):
        try:
            parsed = _read_chains(path, chain_filter)
        except Exception as e:  # whatever a parser raises on a file that is not a structure
            reason = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"
            skipped.append((path, reason))
            warnings.warn(f"skipping {path}: {reason}", stacklevel=2)
            continue
        for chain in parsed:
            n_resolved = chain.msk.count("+")
            where = f"{path}:{chain.id}"
            if n_resolved == 0:
                skipped.append((where, "no residue with N, CA and C coordinates"))
            elif n_resolved < min_len:
                skipped.append((where, f"{n_resolved} resolved residues, fewer than min_len={min_len}"))
            elif chain.id in by_id:
                skipped.append((where, f"duplicate id (already read from {by_id[chain.id]})"))
            else:
                by_id[chain.id] = path
                candidates.append(chain)
    groups = _sequence_groups([c.seq for c in candidates])
    kept, kept_groups, first = [], [], {}
    for chain, group in zip(candidates, groups):
        if unique_sequences and group in first:
            skipped.append((f"{chain.source}:{chain.id}",
                            f"same protein as {first[group]} (near-identical sequence)"))
            continue
        first.setdefault(group, chain.id)
        kept.append(chain)
        kept_groups.append(group)
    if not kept:
        reasons = "; ".join(f"{w}: {r}" for w, r in skipped[:10])
        raise ValueError(f"no usable protein chains in {len(files)} file(s): {reasons}")

    tables = _scn_tables()
    data: dict = {split: {k: [] for k in _SPLIT_FIELDS} for split in ("train", "test") + tables.valid_splits}
    for chain, split in zip(kept, _assign_splits(kept_groups, valid_fraction, test_fraction, seed)):
        entry = data[split]
        length = len(chain.seq)
        entry["seq"].append(chain.seq)
        entry["ang"].append(_measure_angles(chain.seq, chain.crd))
        entry["ids"].append(chain.id)
        entry["evo"].append(np.zeros((length, 21), np.float32))
        entry["msk"].append(chain.msk)
        entry["crd"].append(chain.crd)
        entry["sec"].append(" " * length)  # DSSPVocabulary's pad character: no secondary structure computed
        entry["res"].append(chain.res)
        entry["ums"].append(chain.ums)
        entry["mod"].append(chain.mod)
    for split in list(data):
        data[split] = organize.sort_datasplit(data[split])  # sidechainnet's order: ascending length
    lengths = np.sort(np.asarray([len(c.seq) for c in kept]))
    train_angles = data["train"]["ang"] or [np.full((1, 12), np.nan, np.float32)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (side-chain torsions of short sets)
        angle_means = organize.compute_angle_means(train_angles)
    data["settings"] = {
        "casp_version": "User-specified",
        "thinning": "User-specified",
        "n_proteins": len(kept),
        "angle_means": angle_means,
        "lengths": lengths,
        "max_length": int(lengths.max()),
        "af2_ext": {"files": [os.path.basename(f) for f in files], "skipped": skipped, "seed": seed,
                    "valid_fraction": valid_fraction, "test_fraction": test_fraction, "min_len": min_len,
                    "valid_split": VALID_SPLIT, "evo": "zeros (no MSA computed)"},
    }
    data["description"] = description or (f"af2_ext.app.build_dataset.build_scn_dataset: {len(kept)} protein "
                                          f"chains from {len(files)} structure file(s)")
    data["date"] = datetime.datetime.now().strftime("%I:%M%p %b %d, %Y")
    organize.validate_data_dict(data)
    if output is not None:
        write_scn_dataset(data, os.fspath(output))
    return data


# ----------------------------------------------------------------------------------------------------------
# Command line (af2-ext build-dataset)
# ----------------------------------------------------------------------------------------------------------


def add_build_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``af2-ext build-dataset``."""
    parser.add_argument("files", nargs="+", metavar="FILES",
                        help="PDB / mmCIF files (.gz too) or directories holding them")
    parser.add_argument("-o", "--output", required=True, help="sidechainnet-format pickle to write")
    parser.add_argument("--valid-fraction", type=float, default=0.1, help="share of chains held out for validation")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of chains held out for testing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid/test split")
    parser.add_argument("--min-len", type=int, default=MIN_LEN,
                        help="fewest residues with backbone coordinates a chain needs")
    parser.add_argument("--chains", default=None, help="comma-separated chain ids to keep (default: all)")
    parser.add_argument("--unique-sequences", action="store_true",
                        help="keep only the first chain of each protein (near-identical sequences)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


def _split_summary(data: Mapping) -> list:
    rows = []
    position = {"train": 0, "test": 2}  # valid-* in between
    for split in sorted(split_names(data), key=lambda name: position.get(name, 1)):
        seqs = data[split]["seq"]
        if seqs:
            resolved = sum(m.count("+") for m in data[split]["msk"])
            rows.append(f"  {split:<9} {len(seqs):>5} chains {sum(map(len, seqs)):>7} residues "
                        f"({resolved} with coordinates)")
    return rows


def _check_output_file(output: str, overwrite: bool) -> None:
    if os.path.isdir(output):
        raise ValueError(f"output {output!r} is a directory; -o names the pickle to write")
    if os.path.exists(output) and not overwrite:
        raise ValueError(f"output {output!r} already exists; replace it with --overwrite, or choose another name")
    check_output_dir(os.path.dirname(output) or ".", f"the directory of output {output!r}")


def run_build_dataset(args: argparse.Namespace) -> int:
    """``af2-ext build-dataset``: build, write, print a summary; 0 on success, 2 (and one line naming what is
    wrong) on a user error, as every af2-ext command. An existing output is replaced only with --overwrite."""
    chains = None if args.chains is None else [c.strip() for c in args.chains.split(",") if c.strip()]
    try:
        _check_output_file(os.fspath(args.output), getattr(args, "overwrite", False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # every skip is reported in the summary below
            data = build_scn_dataset(args.files, args.output, valid_fraction=args.valid_fraction,
                                     test_fraction=args.test_fraction, seed=args.seed, min_len=args.min_len,
                                     chains=chains, unique_sequences=args.unique_sequences, progress=True)
    except (ValueError, OSError) as e:
        print(f"af2-ext build-dataset: error: {e}", file=sys.stderr)
        return 2
    report = data["settings"]["af2_ext"]
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1e6:.2f} MB): {data['settings']['n_proteins']} "
          f"chains from {len(report['files'])} file(s)")
    print("\n".join(_split_summary(data)))
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])}:")
        for where, reason in report["skipped"]:
            print(f"  {where}: {reason}")
    return 0

