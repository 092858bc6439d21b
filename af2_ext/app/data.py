"""Training data: sidechainnet 1.0 datasets in, deterministic resumable batches out.

The sidechainnet format (what ``sidechainnet.load(..., scn_dataset=False)`` returns, what its pickles hold, what
``af2-ext build-dataset`` writes: :mod:`af2_ext.app.build_dataset`):
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

Token ids: :func:`af2_ext.app.sequences.sequence_tokens`, the ``RESTYPES`` index; every other letter (``X``,
``B``, ...) and padding is 20 (``residue_constants.UNKNOWN_TOKEN``), which is what sidechainnet's default
vocabulary does with unknown letters and the only id beyond the 20 amino acids the model embeds.

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

import contextlib
import dataclasses
import functools
import importlib
import io
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from af2_ext._checks import check_int
from af2_ext.app.sequences import sequence_tokens
from af2_ext.fileio import atomic_open, check_input_file
from af2_ext.residue_constants import PAD_TOKEN, SCN_ATOMS_PER_RESIDUE, SEED_ATOMS_PER_RESIDUE

__all__ = [
    "NUM_ATOMS",
    "MIN_LEN",
    "DEMO_DATASET",
    "ProteinBatch",
    "ProteinLoader",
    "virtual_cb",
    "demo_dataset_path",
    "load_scn_dict",
    "read_pickle",
    "write_scn_dataset",
    "UntrustedPickleError",
    "load_sidechainnet",
]

NUM_ATOMS = SCN_ATOMS_PER_RESIDUE  # heavy-atom slots per residue; must equal build_info.NUM_COORDS_PER_RES
MIN_LEN = 8  # fewest residues with N, CA and C coordinates a chain needs to be used (loader and builder)
DEMO_DATASET = Path(__file__).resolve().parent.parent / "datasets" / "demo_scn.pkl"

_OXT_SLOT = 4  # the slot sidechainnet 0.x's 14-atom layout (SEED_ATOMS_PER_RESIDUE) does not have
_TOO_LONG_MODES = ("crop", "skip", "error")
# Seed-stream tags: (seed, epoch) and (seed, epoch, batch, position) must never hash to the same state.
_PERMUTATION_STREAM = 0
_CROP_STREAM = 1


def _list_ids(ids: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def import_sidechainnet(module: str = "sidechainnet"):
    """A sidechainnet module, imported (lazily: sidechainnet pulls in openmm and prody) without its
    pkg_resources deprecation notice."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(module)


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ProteinBatch:
    """A padded batch of protein chains (L = longest crop in the batch; padding has ``mask`` False).

    Attributes:
        ids: chain ids, length B.
        seq: int64 (B, L) token ids (``RESTYPES`` index, 20 for unknown residues and padding).
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
    for atoms in (NUM_ATOMS, SEED_ATOMS_PER_RESIDUE):
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
    tokens = sequence_tokens(seq)
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
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.crop_len = check_int("crop_len", crop_len, minimum=1, optional=True)
        self.max_seq_len = check_int("max_seq_len", max_seq_len, minimum=1, optional=True)
        if too_long not in _TOO_LONG_MODES:
            raise ValueError(f"too_long must be one of {_TOO_LONG_MODES}, got {too_long!r}")
        self.too_long = too_long
        self.shuffle = bool(shuffle)
        self.seed = check_int("seed", seed, minimum=0)
        self.world_size = check_int("world_size", world_size, minimum=1)
        self.rank = check_int("rank", rank, minimum=0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {rank}")
        self.with_evo = bool(with_evo)
        self.min_len = check_int("min_len", min_len, minimum=1)
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
        epoch = check_int("epoch", epoch, minimum=0)
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
            if xyz.shape[1] == SEED_ATOMS_PER_RESIDUE:  # [n, 14, 3] -> [n, 15, 3], empty OXT slot
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
        check_int("start", start, minimum=0)
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


def split_names(data: Mapping) -> list:
    """The keys of a sidechainnet dict that hold splits (dicts with a ``seq`` list)."""
    return [k for k, v in data.items() if isinstance(v, Mapping) and "seq" in v]


def _select_split(data: Mapping, split: str, source: str) -> dict:
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a sidechainnet dict, got {type(data).__name__}")
    names = split_names(data)
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
    sidechainnet = import_sidechainnet()
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
    if not isinstance(data, Mapping) or not split_names(data):
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


def write_scn_dataset(data: dict, output: Union[str, os.PathLike]) -> None:
    """Pickle a sidechainnet dict to ``output`` atomically (see :mod:`af2_ext.fileio`)."""
    with atomic_open(output, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)


def demo_dataset_path() -> Path:
    """Path of the bundled demo dataset (sidechainnet format), built by ``scripts/build_demo_dataset.py``."""
    if not DEMO_DATASET.is_file():
        raise FileNotFoundError(f"the bundled demo dataset is missing from this installation ({DEMO_DATASET}); "
                                "reinstall af2_ext, or rebuild it with `python scripts/build_demo_dataset.py`")
    return DEMO_DATASET


