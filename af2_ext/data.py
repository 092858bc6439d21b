"""Training data: sidechainnet 1.0 datasets in, deterministic resumable batches out, and a builder that turns local
PDB / mmCIF files into a sidechainnet-format pickle.

The sidechainnet format (what ``sidechainnet.load(..., scn_dataset=False)`` returns, what its pickles hold):
``{"train": split, "valid-10": split, ..., "valid-90": split, "test": split, "settings": {...},
"description": str, "date": str}`` where a split is a dict of parallel lists, one entry per protein chain:

- ``ids``  ``"1UBI_1_A"`` (PDB id, model, chain)      - ``seq``  one-letter string, length L
- ``msk``  ``"+"`` / ``"-"`` per residue: has coordinates or not
- ``crd``  ``(L, 15, 3)`` (or flat ``(L*15, 3)``) heavy atoms in sidechainnet's per-residue order
  ``ATOM_MAP_HEAVY``: N, CA, C, O, OXT, then the side chain; NaN where an atom is missing. The 14-slot layout
  of sidechainnet 0.x (no OXT slot) is read too.
- ``ang``  ``(L, 12)`` phi, psi, omega, N-CA-C, CA-C-N, C-N-CA, six side-chain torsions (radians, NaN padding)
- ``evo``  ``(L, 21)`` PSSM + information content     - ``sec``  DSSP string
- ``res``  resolution in Å or None                    - ``ums``  space-separated original 3-letter names
- ``mod``  ``(L,)`` 1 where a modified residue was replaced by its parent

Token ids: ``AA_ORDER`` index; every other letter (``X``, ``B``, ...) and padding is 20, which is what sidechainnet's
default vocabulary does with unknown letters and the only id beyond the 20 amino acids the model embeds
(``utils.UNK_TOKEN = 21`` is outside ``num_tokens = 21``).

Loader contract (``ProteinLoader``): a pure function of (dataset, options, epoch, index), so training resumes bit
exactly. Epoch ``e`` orders the proteins by a permutation from a generator seeded with ``(seed, e)`` (dataset order
when ``shuffle=False``) and cuts it into global batches of ``batch_size`` (the last may be smaller). With
``world_size = W`` rank ``r`` gets global batches ``r, r + W, r + 2W, ...``, ``floor(global batches / W)`` of them,
so every rank steps the same number of times (the leftover global batches are dropped that epoch). Crop starts
come from a generator seeded with ``(seed, epoch, global batch index, position in batch)``; the global torch /
numpy / python RNGs are never used. Everything that can be wrong with the data is found when the loader is built.

Pickles and trust: the sidechainnet format is a pickle, and unpickling can run any code the file names. Datasets
are therefore read by :func:`read_pickle`, which builds only plain Python values and numpy arrays (what
``build_scn_dataset`` writes and the sidechainnet format calls for) and refuses a file naming anything else, with an
error naming the file and what it asks for, before any of it runs. Such a file is loaded only when the caller
says it comes from a trusted source (``trusted=True``; ``af2-ext train --trusted-data``), and then in full.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gzip
import importlib
import io
import math
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from Bio.Data.PDBData import protein_letters_3to1_extended  # standard + CCD parents of modified residues
from tqdm import tqdm

from af2_ext.fileio import atomic_open, check_input_file, check_output_dir
from af2_ext.utils import AA_ORDER, ONE_TO_THREE_LETTER_MAP, PAD_TOKEN

__all__ = [
    "NUM_ATOMS",
    "MIN_LEN",
    "VALID_SPLIT",
    "DEMO_DATASET",
    "ProteinBatch",
    "ProteinLoader",
    "virtual_cb",
    "demo_dataset_path",
    "load_scn_dict",
    "read_pickle",
    "UntrustedPickleError",
    "load_sidechainnet",
    "build_scn_dataset",
    "add_build_dataset_arguments",
    "run_build_dataset",
]

NUM_ATOMS = 15  # sidechainnet 1.0 heavy-atom slots per residue; must equal build_info.NUM_COORDS_PER_RES
MIN_LEN = 8  # fewest residues with N, CA and C coordinates a chain needs to be used (loader and builder)
# Where build_scn_dataset puts held-out chains. Only near-identical sequences are kept out of train, weaker than
# any of ProteinNet's validation thresholds, so the loosest label; split="valid" reads every valid-* split.
VALID_SPLIT = "valid-90"
DEMO_DATASET = Path(__file__).resolve().parent / "datasets" / "demo_scn.pkl"

_LEGACY_NUM_ATOMS = 14  # sidechainnet 0.x: N, CA, C, O, side chain; no OXT slot
_OXT_SLOT = 4
_TOO_LONG_MODES = ("crop", "skip", "error")
_SPLIT_FIELDS = ("seq", "ang", "ids", "evo", "msk", "crd", "sec", "res", "ums", "mod")  # organize.EMPTY_SPLIT_DICT
# Seed-stream tags: (seed, epoch) and (seed, epoch, batch, position) must never hash to the same state.
_PERMUTATION_STREAM = 0
_CROP_STREAM = 1
# ProDy's bond test in calcPhi/calcPsi/calcOmega, which sidechainnet's angle measurement uses.
_MAX_C_N_BOND = 4.1
_MAX_PEPTIDE_BOND = 2.0  # a HETATM amino acid counts as part of the chain when peptide-bonded to a neighbour
_MAX_CA_STEP = 3.9  # Å per residue: a numbering gap is filled only if the chain can span it
_STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
# Molecular-dynamics names of standard residues (CHARMM, AMBER protonation states), as sidechainnet's
# measure.ALLOWED_NONSTD_RESIDUES treats them.
_FORCE_FIELD_RESIDUES = {"HSD": "HIS", "HSE": "HIS", "HSP": "HIS", "HID": "HIS", "HIE": "HIS", "HIP": "HIS",
                         "CYX": "CYS", "CYM": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS"}
# Atom names that differ from sidechainnet's: selenomethionine's Se, CHARMM's Ile CD and terminal oxygens.
_ATOM_ALIASES = {"MSE": {"SE": "SD"}, "ILE": {"CD": "CD1"}}
_TERMINAL_ALIASES = {"OT1": "O", "OT2": "OXT"}

_TOKEN_TABLE = np.full(256, PAD_TOKEN, dtype=np.int64)  # ASCII code -> token id
_TOKEN_TABLE[np.frombuffer(AA_ORDER.encode("ascii"), np.uint8)] = np.arange(len(AA_ORDER))
_THREE_TO_ONE = {three: one for one, three in ONE_TO_THREE_LETTER_MAP.items()}


def _list_ids(ids: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _check_int(name: str, value, *, minimum: int, optional: bool = False) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------
# sidechainnet tables (imported lazily: sidechainnet pulls in openmm and prody)
# ----------------------------------------------------------------------------------------------------------


class _ScnTables(NamedTuple):
    atom_names: dict  # one-letter code -> the 15 slot names, "PAD" for unused slots
    torsions: dict  # one-letter code -> slot quadruples of side-chain torsions after the C-N-CA-CB one
    c_n_bond: float
    valid_splits: tuple


def _import_scn(module: str = "sidechainnet"):
    """A sidechainnet module, imported without its pkg_resources deprecation notice."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(module)


@functools.lru_cache(maxsize=None)
def _scn_tables() -> _ScnTables:
    build_info = _import_scn("sidechainnet.structure.build_info")
    ATOM_MAP_HEAVY, SC_HBUILD_INFO = build_info.ATOM_MAP_HEAVY, build_info.SC_HBUILD_INFO
    NUM_COORDS_PER_RES, BB_BUILD_INFO = build_info.NUM_COORDS_PER_RES, build_info.BB_BUILD_INFO
    VALID_SPLITS = _import_scn("sidechainnet.utils.download").VALID_SPLITS
    if NUM_COORDS_PER_RES != NUM_ATOMS:
        raise RuntimeError(f"sidechainnet stores {NUM_COORDS_PER_RES} atoms per residue; af2_ext.data reads the "
                           f"{NUM_ATOMS}-atom layout of sidechainnet 1.0.x")
    atom_names = {aa: tuple(names) for aa, names in ATOM_MAP_HEAVY.items() if aa in AA_ORDER}
    atom_names["X"] = ("N", "CA", "C", "O", "OXT") + ("PAD",) * (NUM_ATOMS - 5)
    torsions = {"X": ()}
    for aa, names in atom_names.items():
        if aa == "X":
            continue
        info = SC_HBUILD_INFO[ONE_TO_THREE_LETTER_MAP[aa]]
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
# Batches
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ProteinBatch:
    """A padded batch of protein chains (L = longest crop in the batch; padding has ``mask`` False).

    Attributes:
        ids: chain ids, length B.
        seq: int64 (B, L) token ids (``AA_ORDER`` index, 20 for unknown residues and padding).
        mask: bool (B, L) a real residue.
        coords: float32 (B, L, 15, 3) heavy atoms in sidechainnet's order, zeros where missing.
        atom_mask: bool (B, L, 15) the atom has coordinates.
        coord_mask: bool (B, L) the residue has N, CA and C.
        ca: float32 (B, L, 3) Cα (zeros where missing).
        cb: float32 (B, L, 3) virtual Cβ from N, CA, C, for every residue with ``coord_mask`` (glycine too).
        evo: float32 (B, L, 21) PSSM + information, or None when the loader was built without ``with_evo``.
        starts: residue offset of each crop in its full chain, length B.
    """

    ids: list[str]
    seq: torch.Tensor
    mask: torch.Tensor
    coords: torch.Tensor
    atom_mask: torch.Tensor
    coord_mask: torch.Tensor
    ca: torch.Tensor
    cb: torch.Tensor
    evo: Optional[torch.Tensor]
    starts: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "ProteinBatch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return ProteinBatch(**moved)


def virtual_cb(n: torch.Tensor, ca: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Ideal-geometry Cβ from backbone atoms (..., 3), the constants of trRosetta / AlphaFold's pseudo-β."""
    b = ca - n
    c_ = c - ca
    a = torch.cross(b, c_, dim=-1)
    return -0.58273431 * a + 0.56802827 * b - 0.54067466 * c_ + ca


# ----------------------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Protein:
    id: str
    tokens: np.ndarray  # int64 (L,)
    crd: np.ndarray  # (L, 15 | 14, 3) view of the dataset's array
    msk: np.ndarray  # bool (L,) "+" in the dataset's msk
    resolved: np.ndarray  # bool (L,) msk "+" and N, CA, C present
    evo: Optional[np.ndarray]  # (L, 21)


def _present(xyz: np.ndarray) -> np.ndarray:
    """Atoms with coordinates: finite and not the all-zero padding of sidechainnet 0.x."""
    return np.isfinite(xyz).all(-1) & (xyz != 0).any(-1)


def _read_entry(split: Mapping, i: int, where: str, with_evo: bool) -> _Protein:
    pid = str(split["ids"][i])
    seq = split["seq"][i]
    if not isinstance(seq, str) or not seq:
        raise ValueError(f"{where}: entry {pid}: seq must be a non-empty string, got {type(seq).__name__}")
    length = len(seq)
    msk = split["msk"][i]
    if not isinstance(msk, str) or len(msk) != length or set(msk) - {"+", "-"}:
        raise ValueError(f"{where}: entry {pid}: msk must be a '+'/'-' string of the sequence length {length}, "
                         f"got {msk!r:.60}")
    crd = np.asarray(split["crd"][i])
    if crd.dtype.kind not in "fiu":
        raise ValueError(f"{where}: entry {pid}: crd must be numeric, got dtype {crd.dtype}")
    for atoms in (NUM_ATOMS, _LEGACY_NUM_ATOMS):
        if crd.shape in ((length * atoms, 3), (length, atoms, 3)):
            crd = crd.reshape(length, atoms, 3)
            break
    else:
        raise ValueError(f"{where}: entry {pid}: crd has shape {crd.shape}; expected ({length}*15, 3) or "
                         f"({length}, 15, 3) for a sequence of length {length}")
    evo = None
    if with_evo:
        evo = np.asarray(split["evo"][i]) if split.get("evo") is not None else None
        if evo is None or evo.shape != (length, 21) or evo.dtype.kind not in "fiu":
            raise ValueError(f"{where}: entry {pid}: with_evo needs evo of shape ({length}, 21), got "
                             f"{None if evo is None else evo.shape}")
    msk_bool = np.frombuffer(msk.encode("ascii"), np.uint8) == ord("+")
    resolved = msk_bool & _present(crd[:, :3]).all(-1)
    tokens = _TOKEN_TABLE[np.frombuffer(seq.upper().encode("ascii", "replace"), np.uint8)]
    return _Protein(pid, tokens, crd, msk_bool, resolved, evo)


class ProteinLoader:
    """Deterministic, resumable, rank-sharded batches over one sidechainnet split (see the module docstring).

    Args:
        split_data: one sidechainnet split: a dict of parallel lists with at least ``ids``, ``seq``, ``msk``, ``crd``
            (and ``evo`` when ``with_evo``).
        batch_size: proteins per batch.
        crop_len: chains longer than this are cut to a random contiguous window of ``crop_len`` residues, drawn
            uniformly among the windows holding at least half as many resolved residues as the best window.
        max_seq_len: longest chain accepted; ``too_long`` says what happens to longer ones: ``"crop"`` (a random
            window as for ``crop_len``), ``"skip"`` (dropped, one warning listing them) or ``"error"``.
        shuffle: permute the proteins each epoch (else dataset order every epoch).
        seed: non-negative; with the epoch it fixes order and crops.
        rank, world_size: this process's shard.
        with_evo: fill ``ProteinBatch.evo`` from the split's ``evo``.
        min_len: chains with fewer residues having N, CA and C are dropped (one warning); chains with none are
            dropped with their own warning; so are chains longer than the crop window whose best window holds
            fewer than ``min(min_len, window)`` of them (every crop drawn holds at least half as many).
        source: how error messages name the data (a path and split).
    """

    def __init__(self, split_data: Mapping, *, batch_size: int = 1, crop_len: Optional[int] = None,
                 max_seq_len: Optional[int] = None, too_long: str = "crop", shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, with_evo: bool = False, min_len: int = MIN_LEN,
                 source: str = "dataset"):
        self.batch_size = _check_int("batch_size", batch_size, minimum=1)
        self.crop_len = _check_int("crop_len", crop_len, minimum=1, optional=True)
        self.max_seq_len = _check_int("max_seq_len", max_seq_len, minimum=1, optional=True)
        if too_long not in _TOO_LONG_MODES:
            raise ValueError(f"too_long must be one of {_TOO_LONG_MODES}, got {too_long!r}")
        self.too_long = too_long
        self.shuffle = bool(shuffle)
        self.seed = _check_int("seed", seed, minimum=0)
        self.world_size = _check_int("world_size", world_size, minimum=1)
        self.rank = _check_int("rank", rank, minimum=0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {rank}")
        self.with_evo = bool(with_evo)
        self.min_len = _check_int("min_len", min_len, minimum=1)
        self.source = source

        missing = [k for k in ("ids", "seq", "msk", "crd") if k not in split_data]
        if missing:
            raise ValueError(f"{source}: split has no {missing} lists (keys: {sorted(split_data)})")
        n = len(split_data["seq"])
        for key in ("ids", "msk", "crd") + (("evo",) if with_evo else ()):
            if split_data.get(key) is None or len(split_data[key]) != n:
                raise ValueError(f"{source}: split lists differ in length: {n} seq vs "
                                 f"{None if split_data.get(key) is None else len(split_data[key])} {key}")

        window = min(x for x in (self.crop_len, self.max_seq_len, math.inf) if x is not None)
        self.window = None if window == math.inf else int(window)
        min_in_crop = min(self.min_len, self.window or self.min_len)
        sparse = f"fewer than {min_in_crop} resolved residues in any {self.window}-residue crop"
        self.skipped: dict = {"no coordinates": [], f"fewer than {self.min_len} resolved residues": [],
                              **({sparse: []} if self.window else {}),
                              f"longer than max_seq_len={self.max_seq_len}": []}
        proteins = []
        for i in range(n):
            p = _read_entry(split_data, i, source, self.with_evo)
            if self.max_seq_len is not None and len(p.tokens) > self.max_seq_len:
                if too_long == "error":
                    raise ValueError(f"{source}: {p.id} has {len(p.tokens)} residues, more than "
                                     f"max_seq_len={self.max_seq_len} (too_long='error'; use 'crop' or 'skip')")
                if too_long == "skip":
                    self.skipped[f"longer than max_seq_len={self.max_seq_len}"].append(p.id)
                    continue
            n_resolved = int(p.resolved.sum())
            if n_resolved == 0:
                self.skipped["no coordinates"].append(p.id)
            elif n_resolved < self.min_len:
                self.skipped[f"fewer than {self.min_len} resolved residues"].append(p.id)
            elif self._best_window(p) < min_in_crop:
                self.skipped[sparse].append(p.id)  # its crops would hold too few: found now, not mid-epoch
            else:
                proteins.append(p)
        for reason, ids in self.skipped.items():
            if ids:
                warnings.warn(f"{source}: skipped {len(ids)} chain(s) with {reason}: {_list_ids(ids)}",
                              stacklevel=3)
        if not proteins:
            raise ValueError(f"{source}: no usable protein chains among {n} entries")
        self._proteins = proteins
        self.num_global_batches = -(-len(proteins) // self.batch_size)
        self._len = self.num_global_batches // self.world_size
        if self._len == 0:
            raise ValueError(f"{source}: {len(proteins)} chains make {self.num_global_batches} batches of "
                             f"{self.batch_size}, fewer than world_size={self.world_size}")
        self._order_cache: tuple = (None, None)

    @property
    def ids(self) -> list:
        """Chain ids in dataset order (after the build-time filters)."""
        return [p.id for p in self._proteins]

    @property
    def num_proteins(self) -> int:
        return len(self._proteins)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._len

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache[0] != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch])
                order = rng.permutation(len(self._proteins))
            else:
                order = np.arange(len(self._proteins))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _window_counts(self, p: _Protein) -> np.ndarray:
        """Resolved residues in each window of ``self.window`` (the chain is one window when not longer)."""
        if self.window is None or len(p.tokens) <= self.window:
            return np.asarray([int(p.resolved.sum())])
        cumulative = np.concatenate([[0], np.cumsum(p.resolved, dtype=np.int64)])
        return cumulative[self.window:] - cumulative[:-self.window]  # [length - window + 1]

    def _best_window(self, p: _Protein) -> int:
        """The most resolved residues a crop of the chain can hold; every crop drawn holds at least half."""
        return int(self._window_counts(p).max())

    def _crop_start(self, p: _Protein, epoch: int, global_index: int, position: int) -> int:
        length = len(p.tokens)
        if self.window is None or length <= self.window:
            return 0
        counts = self._window_counts(p)
        candidates = np.flatnonzero(2 * counts >= counts.max())
        rng = np.random.default_rng([self.seed, _CROP_STREAM, epoch, global_index, position])
        return int(candidates[rng.integers(len(candidates))])

    def batch(self, epoch: int, index: int) -> ProteinBatch:
        """The ``index``-th batch of ``epoch`` on this rank (global batch ``rank + index * world_size``)."""
        epoch = _check_int("epoch", epoch, minimum=0)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self._len:
            raise IndexError(f"batch index must be in [0, {self._len}), got {index!r}")
        global_index = self.rank + int(index) * self.world_size
        members = self._order(epoch)[global_index * self.batch_size:(global_index + 1) * self.batch_size]
        crops = []
        for position, i in enumerate(members):
            p = self._proteins[i]
            start = self._crop_start(p, epoch, global_index, position)
            stop = start + min(len(p.tokens), self.window or len(p.tokens))
            crops.append((p, start, stop))
        return self._collate(crops)

    def _collate(self, crops: list) -> ProteinBatch:
        b = len(crops)
        length = max(stop - start for _, start, stop in crops)
        seq = np.full((b, length), PAD_TOKEN, np.int64)
        mask = np.zeros((b, length), bool)
        coords = np.zeros((b, length, NUM_ATOMS, 3), np.float32)
        atom_mask = np.zeros((b, length, NUM_ATOMS), bool)
        evo = np.zeros((b, length, 21), np.float32) if self.with_evo else None
        for j, (p, start, stop) in enumerate(crops):
            n = stop - start
            seq[j, :n] = p.tokens[start:stop]
            mask[j, :n] = True
            xyz = np.asarray(p.crd[start:stop], dtype=np.float32)
            if xyz.shape[1] == _LEGACY_NUM_ATOMS:  # [n, 14, 3] -> [n, 15, 3], empty OXT slot
                xyz = np.insert(xyz, _OXT_SLOT, np.nan, axis=1)
            present = _present(xyz) & p.msk[start:stop, None]
            coords[j, :n] = np.where(present[..., None], xyz, 0.0)
            atom_mask[j, :n] = present
            if evo is not None:
                evo[j, :n] = np.nan_to_num(np.asarray(p.evo[start:stop], dtype=np.float32))
        coords_t = torch.from_numpy(coords)
        coord_mask = torch.from_numpy(atom_mask[..., :3].all(-1))
        cb = virtual_cb(coords_t[..., 0, :], coords_t[..., 1, :], coords_t[..., 2, :])
        cb = torch.where(coord_mask[..., None], cb, torch.zeros((), dtype=cb.dtype))
        return ProteinBatch(
            ids=[p.id for p, _, _ in crops],
            seq=torch.from_numpy(seq),
            mask=torch.from_numpy(mask),
            coords=coords_t,
            atom_mask=torch.from_numpy(atom_mask),
            coord_mask=coord_mask,
            ca=coords_t[..., 1, :].clone(),
            cb=cb,
            evo=None if evo is None else torch.from_numpy(evo),
            starts=[start for _, start, _ in crops],
        )

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple]:
        """(index, batch) for this rank's batches ``start, start + 1, ...`` of ``epoch`` (resume at ``start``)."""
        _check_int("start", start, minimum=0)
        for index in range(start, self._len):
            yield index, self.batch(epoch, index)

    def __iter__(self) -> Iterator[ProteinBatch]:
        """The batches of epoch 0."""
        for _, batch in self.epoch_batches(0):
            yield batch

    def __repr__(self) -> str:
        return (f"ProteinLoader({self.source}, proteins={len(self._proteins)}, batches={self._len}, "
                f"batch_size={self.batch_size}, window={self.window}, rank={self.rank}/{self.world_size})")

    @classmethod
    def from_scn_dict(cls, data: Mapping, split: str = "train", *, source: str = "dataset",
                      **kwargs) -> "ProteinLoader":
        """Loader over ``split`` of a whole sidechainnet dict; ``split="valid"`` joins every ``valid-*`` split."""
        return cls(_select_split(data, split, source), source=f"{source} [{split}]", **kwargs)


def _split_names(data: Mapping) -> list:
    return [k for k, v in data.items() if isinstance(v, Mapping) and "seq" in v]


def _select_split(data: Mapping, split: str, source: str) -> dict:
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a sidechainnet dict, got {type(data).__name__}")
    names = _split_names(data)
    if split == "valid":
        chosen = sorted((k for k in names if k.startswith("valid")),
                        key=lambda k: (int(k[6:]) if k[6:].isdigit() else math.inf, k))
    else:
        chosen = [split] if split in names else []
    if not chosen or not any(len(data[k]["seq"]) for k in chosen):
        sizes = ", ".join(f"{k} ({len(data[k]['seq'])})" for k in names) or "none"
        raise ValueError(f"{source}: no chains in split {split!r}; splits present: {sizes}")
    if len(chosen) == 1:
        return data[chosen[0]]
    joined: dict = {}
    for key in ("ids", "seq", "msk", "crd", "evo"):
        if all(data[k].get(key) is not None for k in chosen):
            joined[key] = [x for k in chosen for x in data[k][key]]
    return joined


# ----------------------------------------------------------------------------------------------------------
# Loading sidechainnet
# ----------------------------------------------------------------------------------------------------------


# What a dataset pickle may name: numpy's array and scalar reconstruction (numpy 1 and 2 module paths) and a few
# builtins that only build values. Dicts, lists, tuples, strings, numbers, None and bytes need no name at all.
_SAFE_GLOBALS = frozenset({
    *((core, name) for core in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct",
                                                                                                "scalar")),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    *(("builtins", name) for name in ("set", "frozenset", "bytes", "bytearray", "complex")),
    ("_codecs", "encode"),  # how protocols 0-2 store bytes (numpy arrays in older pickles)
})


class UntrustedPickleError(ValueError):
    """A dataset pickle names a class or function beyond numpy arrays and plain values (see :func:`read_pickle`).
    Not a ``pickle.UnpicklingError``: sidechainnet answers those by downloading over the file."""


class _DataUnpickler(pickle.Unpickler):
    """Builds plain values and numpy arrays only: any other global the pickle names is refused before it is
    looked up, so nothing in the file runs."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if ("builtins" if module == "__builtin__" else module, name) in _SAFE_GLOBALS:  # protocols 0-2: Python 2 names
            return super().find_class(module, name)
        raise UntrustedPickleError(
            f"{self.path}: the pickle names {module}.{name}, and af2_ext reads datasets with numpy arrays and plain "
            "values only, because unpickling anything else can run code from the file; only if it comes from a "
            "source you trust, load it with trusted=True (af2-ext train --trusted-data)")


def read_pickle(path: Union[str, os.PathLike], trusted: bool = False):
    """Unpickle a dataset. By default only plain Python values (dict, list, tuple, str, numbers, None, bytes,
    set) and numpy arrays are built — what ``build_scn_dataset`` writes and the sidechainnet format calls for —
    so a malicious file cannot run code; a pickle naming anything else raises :class:`UntrustedPickleError` (a
    ValueError) naming the file and what it asks for. ``trusted=True`` unpickles it in full: do that only for a
    file from a source you trust."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        return pickle.load(f) if trusted else _DataUnpickler(f, path).load()


@contextlib.contextmanager
def _sidechainnet_reading(path: Optional[str], trusted: bool) -> Iterator[None]:
    """sidechainnet.load reading its pickle through :func:`read_pickle`; with a local ``path``, also without
    sidechainnet's answer to an UnpicklingError, which is downloading CASP 12 over the local file."""
    scn_load = importlib.import_module("sidechainnet.utils.load")

    def refuse(*args, **kwargs):
        raise ValueError(f"{path} is not a readable sidechainnet pickle (corrupt or truncated)")

    saved = scn_load._download_sidechainnet, scn_load._load_dict
    scn_load._load_dict = functools.partial(read_pickle, trusted=trusted)
    if path is not None:
        scn_load._download_sidechainnet = refuse
    try:
        yield
    finally:
        scn_load._download_sidechainnet, scn_load._load_dict = saved


def load_scn_dict(casp_version: Union[int, str] = 12, casp_thinning: Union[int, str] = 30,
                  scn_dir: Union[str, os.PathLike] = "./sidechainnet_data",
                  local_scn_path: Optional[Union[str, os.PathLike]] = None, *, trusted: bool = False) -> dict:
    """The sidechainnet dict, through ``sidechainnet.load(..., scn_dataset=False)``.

    With ``local_scn_path`` the network is never used: a missing file raises FileNotFoundError and an unreadable
    one ValueError, both naming the path. Without it, finding or downloading ``casp_version`` / ``casp_thinning``
    under ``scn_dir`` is sidechainnet's job. Either way the pickle is read by :func:`read_pickle`: numpy arrays
    and plain values only unless ``trusted``.
    """
    sidechainnet = _import_scn()
    if local_scn_path is None:
        with _sidechainnet_reading(None, trusted):
            data = sidechainnet.load(casp_version, casp_thinning, os.fspath(scn_dir), scn_dataset=False)
        source = f"sidechainnet CASP {casp_version} thinning {casp_thinning} in {scn_dir}"
    else:
        source = check_input_file(local_scn_path, "sidechainnet pickle")
        chatter = io.StringIO()  # "Redownloading due to Pickle file error." would be untrue here
        try:
            with _sidechainnet_reading(source, trusted), contextlib.redirect_stdout(chatter):
                data = sidechainnet.load(local_scn_path=source, scn_dataset=False)
        except MemoryError:
            raise
        except Exception as e:  # what unpickling raises besides UnpicklingError (EOFError, ...), or its filters
            if isinstance(e, ValueError) and source in str(e):
                raise
            raise ValueError(f"{source} is not a readable sidechainnet pickle ({type(e).__name__}: {e})") from e
    if not isinstance(data, Mapping) or not _split_names(data):
        raise ValueError(f"{source} is not a sidechainnet dataset: expected a dict of splits with 'seq' lists, "
                         f"got {type(data).__name__}")
    return data


def load_sidechainnet(casp_version: Union[int, str] = 12, casp_thinning: Union[int, str] = 30,
                      scn_dir: Union[str, os.PathLike] = "./sidechainnet_data",
                      local_scn_path: Optional[Union[str, os.PathLike]] = None, *, split: str = "train",
                      batch_size: int = 1, crop_len: Optional[int] = None, max_seq_len: Optional[int] = None,
                      too_long: str = "crop", shuffle: bool = True, seed: int = 0, rank: int = 0,
                      world_size: int = 1, with_evo: bool = False, min_len: int = MIN_LEN,
                      trusted: bool = False) -> ProteinLoader:
    """A ``ProteinLoader`` over one split of a sidechainnet dataset (``load_scn_dict`` + ``from_scn_dict``).

    ``split``: ``"train"``, ``"test"``, a ``"valid-<n>"`` split, or ``"valid"`` for all of them. To read several
    splits of a large dataset once, call ``load_scn_dict`` and ``ProteinLoader.from_scn_dict`` per split.
    """
    data = load_scn_dict(casp_version, casp_thinning, scn_dir, local_scn_path, trusted=trusted)
    source = os.fspath(local_scn_path) if local_scn_path is not None else f"sidechainnet CASP {casp_version}"
    return ProteinLoader.from_scn_dict(data, split, source=source, batch_size=batch_size, crop_len=crop_len,
                                       max_seq_len=max_seq_len, too_long=too_long, shuffle=shuffle, seed=seed,
                                       rank=rank, world_size=world_size, with_evo=with_evo, min_len=min_len)


def demo_dataset_path() -> Path:
    """Path of the bundled demo dataset (sidechainnet format), built by ``scripts/build_demo_dataset.py``."""
    if not DEMO_DATASET.is_file():
        raise FileNotFoundError(f"the bundled demo dataset is missing from this installation ({DEMO_DATASET}); "
                                "reinstall af2_ext, or rebuild it with `python scripts/build_demo_dataset.py`")
    return DEMO_DATASET


# ----------------------------------------------------------------------------------------------------------
# Structure files -> chains
# ----------------------------------------------------------------------------------------------------------
# Parsed with Bio.PDB (already a dependency) rather than ProDy: one Structure/Model/Chain/Residue API for PDB
# and mmCIF, file handles in (so .gz is just gzip.open), explicit hetero flags, and alternate locations we resolve
# ourselves (the first one in the file; ProDy keeps only altloc 'A'). sidechainnet's own ProDy route,
# measure.get_seq_coords_and_angles, drops unobserved residues and raises on unknown ones, so it is not used;
# _measure_angles reproduces its angles (checked against it in the tests).


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


def _residue_letter(resname: str) -> tuple:
    """(one-letter code, modified) for an amino-acid residue name, or (None, False) for anything else."""
    resname = resname.strip().upper()
    if resname in _THREE_TO_ONE:
        return _THREE_TO_ONE[resname], False
    parent = _THREE_TO_ONE.get(_FORCE_FIELD_RESIDUES.get(resname, "")) or protein_letters_3to1_extended.get(resname)
    if parent and parent in AA_ORDER:
        return parent, True
    if resname == "UNK":
        return "X", False
    return None, False


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
        atoms.setdefault(atom.get_id(), atom.get_coord())
    return atoms


def _residue_coords(letter: str, resname: str, atoms: dict) -> np.ndarray:
    names = _scn_tables().atom_names[letter]
    alias = {**_TERMINAL_ALIASES, **_ATOM_ALIASES.get(ONE_TO_THREE_LETTER_MAP.get(letter), {}),
             **_ATOM_ALIASES.get(resname, {})}
    xyz = np.full((NUM_ATOMS, 3), np.nan, np.float32)
    for name, coord in atoms.items():
        name = alias.get(name, name)
        if name in names:
            xyz[names.index(name)] = coord
    if not np.isfinite(xyz[:3]).all():
        xyz[:] = np.nan  # msk '-': a residue without N, CA and C counts as unresolved
    return xyz


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
        if hetflag != "W" and _residue_letter(residue.get_resname())[0] is not None:
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
    chain break becomes that many unknown residues (msk '-'), when the Cα distance allows it."""
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


def _chain_record(chain_id: str, residues: list, res: Optional[float], source: str) -> _Chain:
    letters, crds, ums, mod = [], [], [], []
    for resname, atoms in residues:
        resname = resname.strip().upper()
        letter, modified = _residue_letter(resname)
        if letter is None:
            continue  # an unobserved cap or other monomer that is not an amino acid
        letters.append(letter)
        ums.append(resname)
        mod.append(int(modified))
        crds.append(np.full((NUM_ATOMS, 3), np.nan, np.float32) if atoms is None
                    else _residue_coords(letter, resname, atoms))
    crd = np.stack(crds)
    msk = "".join("+" if np.isfinite(x[1]).all() else "-" for x in crd)
    return _Chain(chain_id, "".join(letters), crd, msk, " ".join(ums), np.asarray(mod, np.int8), res, source)


def _gzipped(path: str) -> bool:
    return path.lower().endswith(".gz")


def _open_text(path: str):
    return gzip.open(path, "rt") if _gzipped(path) else open(path, "rt")


def _is_mmcif(path: str) -> bool:
    stem = (path[:-3] if _gzipped(path) else path).lower()
    if stem.endswith((".cif", ".mmcif")):
        return True
    if stem.endswith((".pdb", ".ent")):
        return False
    with _open_text(path) as f:
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
    for suffix in (".gz",) + _STRUCTURE_SUFFIXES:
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
                and _residue_letter(line[17:20])[0] is not None):
            raise ValueError("two-character chain ids (PDB columns 21-22) are not standard PDB; use mmCIF")


def _parse_structure(path: str, chains: Optional[set]) -> list:
    """The protein chains of one structure file (first model); raises on a file that is not a structure or holds
    no protein chain."""
    from Bio.PDB import MMCIFParser, PDBParser
    from Bio.PDB.MMCIF2Dict import MMCIF2Dict

    with _open_text(path) as f:
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
    pdb_id, res, serial = _pdb_id(header, path), _resolution(header), model.serial_num or 1
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
        out.append(_chain_record(f"{pdb_id}_{serial}_{chain_id}", residues, res, path))
    if not out:
        raise ValueError("no protein chains" + (f" among chains {sorted(chains)}" if chains else ""))
    return out


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
                    base = name[:-3] if _gzipped(name) else name
                    if base.lower().endswith(_STRUCTURE_SUFFIXES):
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


def write_scn_dataset(data: dict, output: Union[str, os.PathLike]) -> None:
    """Pickle a sidechainnet dict to ``output`` atomically (see :mod:`af2_ext.fileio`)."""
    with atomic_open(output, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)


def build_scn_dataset(paths: Iterable[Union[str, os.PathLike]], output: Optional[Union[str, os.PathLike]] = None,
                      *, valid_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                      min_len: int = MIN_LEN, chains: Optional[Iterable[str]] = None,
                      unique_sequences: bool = False, progress: bool = False,
                      description: Optional[str] = None) -> dict:
    """A sidechainnet-format dataset from local PDB / mmCIF files (``.gz`` too; directories are searched).

    One entry per protein chain of the first model, id ``<PDB id>_<model>_<chain>`` (PDB id from the header, else
    the file name). Amino acids only: modified residues become their parent (MSE -> MET, listed in ``mod`` and
    ``ums``), other polymer residues are ``X``; waters and ligands are dropped; the first alternate location
    is kept. Unobserved residues (mmCIF ``_pdbx_poly_seq_scheme``, PDB ``REMARK 465``) are in ``seq`` with
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
    organize = _import_scn("sidechainnet.utils.organize")

    for name, fraction in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}")
    if valid_fraction + test_fraction >= 1:
        raise ValueError(f"valid_fraction + test_fraction must be < 1, got {valid_fraction + test_fraction}")
    seed = _check_int("seed", seed, minimum=0)
    min_len = _check_int("min_len", min_len, minimum=1)
    chain_filter = None if chains is None else {str(c) for c in chains}
    files = _expand_paths(paths)
    if not files:
        raise ValueError("no input files")

    candidates: list = []
    skipped: list = []
    by_id: dict = {}
    for path in tqdm(files, desc="structures", unit="file", disable=not progress, file=sys.stderr):
        try:
            parsed = _parse_structure(path, chain_filter)
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
    data["description"] = description or (f"af2_ext.data.build_scn_dataset: {len(kept)} protein chains from "
                                          f"{len(files)} structure file(s)")
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
    for split in sorted(_split_names(data), key=lambda name: position.get(name, 1)):
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
