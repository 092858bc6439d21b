"""The seed-compatible face: ``alphafold2_pytorch.utils`` of alphafold2-pytorch 0.0.19 (the seed), same names,
signatures and conventions, over the library modules that hold the work:

- :mod:`af2_ext.residue_constants`: the vocabulary, the seed's 14-slot atom layout, the distogram bins (the
  constants below are its values under the seed's names);
- :mod:`af2_ext.geometry`: dihedrals, NeRF, backbone phi, ``Kabsch``, the seed's ``RMSD`` / ``GDT`` /
  ``TMscore``, the atom-layout masks and ``sidechain_container``;
- :mod:`af2_ext.mds`: distogram labels and centring, ``MDScaling`` (weighted SMACOF) and ``distogram_to_coords``;
- :mod:`af2_ext.structure_scores`: the standard ``tm_score`` / ``gdt_ts``, ``lddt_ca``, ``distogram_accuracy``;
- :mod:`af2_ext.protein`: ``pdb_chain_text`` / ``write_pdb``.

This module defines only the seed's backend-specific names (``mds_*``, ``mdscaling_*``, ``fix_mirrors_*``,
``kabsch_*``, ``rmsd_*``, ``gdt_*``, ``tmscore_*``, ``get_dihedral_numpy``), its decorators (``expand_dims_to``,
``set_backend_kwarg``, ``expand_arg_dims``, ``invoke_torch_or_numpy``) and its network helpers (``download_pdb``,
``clean_pdb``, ``custom2pdb``). Coordinates for alignment and scores are the seed's ``(3, N)`` or
``(B, 3, N)``; functions that take arrays accept torch tensors or numpy arrays and return the kind they were given
(``backend="torch" | "numpy"`` forces one, as the seed's ``backend`` keyword did).

Deliberate differences from the seed, each said again where it applies:
- ``center_distogram_torch`` normalises each distribution and takes negative input (raw logits) as logits,
  softmaxing it with a warning.
- ``MDScaling`` uses the weighted Guttman transform (``V^+ B(X) X``); the seed's ``B(X) X / N`` is exact only for
  unit weights and shrinks the structure under the distogram's weights. It starts from classical MDS, not a
  random draw (so ``fix_mirror = k`` mirrors one embedding instead of drawing k), and its stress history is the
  stress itself. Its shapes are the seed's: (3, N) with ``fix_mirror=0``, (1, 3, N) with ``fix_mirror > 0``;
  ``batched=True`` (keyword-only) gives (B, 3, N) always.
- ``RMSD`` is ``sqrt(mean_i |a_i - b_i|^2)``; the seed averaged over the 3 coordinates too (``/ sqrt(3)`` low).
- ``GDT`` with ``weights`` is a weighted mean (the seed divided the weighted sum by the number of cutoffs).
- ``TMscore`` clamps ``d0`` at 0.5 Å for short chains as TM-score does (the seed's ``d0`` was <= 0 for L <= 19).
- ``sidechain_container(place_oxygen=True)`` puts O at the CA-C-O bond angle 2.0944 rad; the seed passed that angle
  as its NeRF theta (the supplement), which put O at 60 degrees from CA.
- ``custom2pdb`` converts Å to mdtraj's nm (the seed wrote coordinates 10x too large); ``download_pdb`` raises
  ConnectionError offline (the seed's ``curl`` wrote an empty file).
- Unknown mode strings, NaNs and bad shapes raise ``ValueError`` / ``TypeError`` naming the argument.

``TMscore`` and ``GDT`` keep the seed's definitions: the score of the coordinates as given (after ``Kabsch``,
the RMSD-optimal superposition, which understates any model that is not near-perfect). The standard scores,
each under the superposition that maximises it, are ``tm_score`` and ``gdt_ts``.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np
import torch

from af2_ext import mds as _mds
from af2_ext import residue_constants as _rc
from af2_ext._backend import as_tensor, check_backend, to_output
from af2_ext.fileio import atomic_open
from af2_ext.geometry import (GDT, RMSD, Kabsch, TMscore, calc_phis_torch, get_dihedral_torch, nerf_torch,
                              scn_backbone_mask, scn_cloud_mask, sidechain_container)
from af2_ext.mds import (MDScaling, center_distogram_torch, distogram_to_coords, get_bucketed_distance_matrix,
                         select_mirror)
from af2_ext.protein import pdb_chain_text, write_pdb
from af2_ext.structure_scores import distogram_accuracy, gdt_ts, lddt_ca, tm_score, tm_score_d0

__all__ = [
    "DISTOGRAM_BUCKETS",
    "DISTANCE_THRESHOLDS",
    "NUM_COORDS_PER_RES",
    "GLOBAL_PAD_CHAR",
    "AA_ORDER",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "ONE_TO_THREE_LETTER_MAP",
    "THREE_TO_ONE_LETTER_MAP",
    "BACKBONE_ATOM_NAMES",
    "SC_ATOM_NAMES",
    "BB_BUILD_INFO",
    "get_bucketed_distance_matrix",
    "center_distogram_torch",
    "MDScaling",
    "calc_phis_torch",
    "get_dihedral_torch",
    "nerf_torch",
    "Kabsch",
    "RMSD",
    "GDT",
    "TMscore",
    "tm_score",
    "tm_score_d0",
    "gdt_ts",
    "lddt_ca",
    "distogram_accuracy",
    "scn_backbone_mask",
    "scn_cloud_mask",
    "sidechain_container",
    "distogram_to_coords",
    "pdb_chain_text",
    "write_pdb",
    # the seed's backend-specific names, decorators and network helpers
    "expand_dims_to",
    "set_backend_kwarg",
    "expand_arg_dims",
    "invoke_torch_or_numpy",
    "mds_torch",
    "mds_numpy",
    "mdscaling_torch",
    "mdscaling_numpy",
    "fix_mirrors_torch",
    "fix_mirrors_numpy",
    "get_dihedral_numpy",
    "kabsch_torch",
    "kabsch_numpy",
    "rmsd_torch",
    "rmsd_numpy",
    "gdt_torch",
    "gdt_numpy",
    "tmscore_torch",
    "tmscore_numpy",
    "download_pdb",
    "clean_pdb",
    "custom2pdb",
]

# ----------------------------------------------------------------------------------------------------------
# The seed's constants: residue_constants' values under the seed's names
# ----------------------------------------------------------------------------------------------------------

DISTOGRAM_BUCKETS = _rc.DISTOGRAM_BUCKETS
DISTANCE_THRESHOLDS = _rc.DISTANCE_THRESHOLDS
# The seed's (sidechainnet 0.x's) layout: 14 atom slots per residue, N, CA, C, O, side chain, padding
# (sidechainnet 1.0 has 15: residue_constants.SCN_ATOMS_PER_RESIDUE).
NUM_COORDS_PER_RES = _rc.SEED_ATOMS_PER_RESIDUE
GLOBAL_PAD_CHAR = _rc.COORD_PAD_VALUE
# sidechainnet's vocabulary: tokens 0..19 in AA_ORDER, 20 pad, 21 unknown (the model's vocabulary stops at 20).
AA_ORDER = _rc.RESTYPES
PAD_TOKEN = _rc.PAD_TOKEN
UNK_TOKEN = _rc.SCN_UNKNOWN_TOKEN
ONE_TO_THREE_LETTER_MAP = _rc.ONE_TO_THREE
THREE_TO_ONE_LETTER_MAP = _rc.THREE_TO_ONE
BACKBONE_ATOM_NAMES = _rc.BACKBONE_ATOM_NAMES
SC_ATOM_NAMES = _rc.SIDECHAIN_ATOM_NAMES
BB_BUILD_INFO = _rc.BACKBONE_BUILD_INFO

_WARNED = _mds._WARNED  # center_distogram_torch's one-time warnings, reset by tests as utils._WARNED


# ----------------------------------------------------------------------------------------------------------
# The seed's backend-specific names and decorators (thin faces over the library functions)
# ----------------------------------------------------------------------------------------------------------


def expand_dims_to(t, length: int = 3):
    """``t`` with ``length`` leading dimensions of size 1 prepended (torch or numpy; ``length <= 0``: ``t``)."""
    if length <= 0:
        return t
    return t.reshape(*((1,) * length), *t.shape)


def set_backend_kwarg(fn):
    """Decorator: resolves ``backend="auto"`` (the default) to "torch" when the first argument is a tensor,
    else "numpy", and passes it to ``fn`` as ``backend=``."""
    @functools.wraps(fn)
    def inner(*args, backend: str = "auto", **kwargs):
        backend = check_backend(backend)
        if backend == "auto":
            backend = "torch" if isinstance(args[0], torch.Tensor) else "numpy"
        return fn(*args, backend=backend, **kwargs)
    return inner


def expand_arg_dims(dim_len: int = 3):
    """Decorator factory: pads both positional arguments ``(x, y)`` of the wrapped function with leading size-1
    dimensions up to ``dim_len`` dimensions (``(3, N)`` -> ``(1, 3, N)``)."""
    def outer(fn):
        @functools.wraps(fn)
        def inner(x, y, **kwargs):
            if len(x.shape) != len(y.shape):
                raise ValueError(f"the two arguments must have as many dimensions, got {tuple(x.shape)} and "
                                 f"{tuple(y.shape)}")
            remaining = dim_len - len(x.shape)
            return fn(expand_dims_to(x, length=remaining), expand_dims_to(y, length=remaining), **kwargs)
        return inner
    return outer


def invoke_torch_or_numpy(torch_fn, numpy_fn):
    """Decorator factory: the wrapped function (called with a ``backend=`` keyword, see
    :func:`set_backend_kwarg`) returns the arguments for the backend function, optionally ending with a dict of
    keyword arguments; they are converted to tensors / arrays and passed to ``torch_fn`` or ``numpy_fn``."""
    def outer(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            backend = kwargs.pop("backend")
            passed = list(fn(*args, **kwargs))
            passed_kwargs = passed.pop() if passed and isinstance(passed[-1], dict) else {}
            if backend == "torch":
                passed = [torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
                          for a in passed]
                return torch_fn(*passed, **passed_kwargs)
            if backend == "numpy":
                passed = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a for a in passed]
                return numpy_fn(*passed, **passed_kwargs)
            raise ValueError(f"backend must be 'torch' or 'numpy', got {backend!r}")
        return inner
    return outer


def mds_torch(pre_dist_mat, weights=None, iters: int = 10, tol: float = 1e-5, verbose: int = 2):
    """Metric MDS of (B, N, N) distances, torch out: :func:`MDScaling` without mirror fixing, batched.

    Returns:
        coords (B, 3, N) and the stress history (B, steps).
    """
    return MDScaling(pre_dist_mat, weights, iters=iters, tol=tol, verbose=verbose, backend="torch", batched=True)


def mds_numpy(pre_dist_mat, weights=None, iters: int = 10, tol: float = 1e-5, verbose: int = 2):
    """:func:`mds_torch` with numpy outputs."""
    return MDScaling(pre_dist_mat, weights, iters=iters, tol=tol, verbose=verbose, backend="numpy", batched=True)


def mdscaling_torch(pre_dist_mat, weights=None, iters: int = 10, tol: float = 1e-5, fix_mirror: int = 0,
                    N_mask=None, CA_mask=None, C_mask=None, verbose: int = 2):
    """The seed's MDS entry point, torch out: :func:`MDScaling` (its arguments, shapes and differences).

    Returns:
        fix_mirror = 0: coords (3, N) and stresses (steps,) for one structure ((B, 3, N), (B, steps) for B > 1).
        fix_mirror > 0: coords (1, 3, N) of the chirality with mostly negative phi, and stresses (steps,).
    """
    return MDScaling(pre_dist_mat, weights, iters=iters, tol=tol, fix_mirror=fix_mirror, N_mask=N_mask,
                     CA_mask=CA_mask, C_mask=C_mask, verbose=verbose, backend="torch")


def mdscaling_numpy(pre_dist_mat, weights=None, iters: int = 10, tol: float = 1e-5, fix_mirror: int = 0,
                    N_mask=None, CA_mask=None, C_mask=None, verbose: int = 2):
    """:func:`mdscaling_torch` with numpy outputs."""
    return MDScaling(pre_dist_mat, weights, iters=iters, tol=tol, fix_mirror=fix_mirror, N_mask=N_mask,
                     CA_mask=CA_mask, C_mask=C_mask, verbose=verbose, backend="numpy")


def _fix_mirrors(preds, stresses, N_mask, CA_mask, C_mask, verbose, to_numpy):
    best = select_mirror(preds, N_mask, CA_mask, C_mask)
    if verbose:
        print(f"fix_mirrors: structure {best} has the most negative phi")
    p, _ = as_tensor("preds", preds)
    return to_output(p[best:best + 1], to_numpy), stresses[best]


def fix_mirrors_torch(preds, stresses, N_mask, CA_mask, C_mask=None, verbose: int = 0):
    """Of ``preds`` (n_mirrors, 3, N), the structure with the largest share of negative phi angles (real proteins'
    chirality; :func:`af2_ext.mds.select_mirror`), as (1, 3, N), and ``stresses[i]`` of that structure."""
    return _fix_mirrors(preds, stresses, N_mask, CA_mask, C_mask, verbose, to_numpy=False)


def fix_mirrors_numpy(preds, stresses, N_mask, CA_mask, C_mask=None, verbose: int = 0):
    """:func:`fix_mirrors_torch` with a numpy structure out."""
    return _fix_mirrors(preds, stresses, N_mask, CA_mask, C_mask, verbose, to_numpy=True)


def get_dihedral_numpy(c1, c2, c3, c4):
    """:func:`get_dihedral_torch` with a numpy result."""
    return to_output(torch.as_tensor(get_dihedral_torch(c1, c2, c3, c4)), True)


def kabsch_torch(X, Y):
    """:func:`Kabsch` of (3, N) coordinates, torch out: (X centred and rotated onto Y, Y centred)."""
    return Kabsch(X, Y, backend="torch")


def kabsch_numpy(X, Y):
    """:func:`Kabsch`, numpy out."""
    return Kabsch(X, Y, backend="numpy")


def rmsd_torch(X, Y):
    """:func:`RMSD` of (B, 3, N) coordinates, torch out (the fixed RMSD: the seed's was ``/ sqrt(3)`` low)."""
    return RMSD(X, Y, backend="torch")


def rmsd_numpy(X, Y):
    """:func:`RMSD`, numpy out (the fixed RMSD: the seed's was ``/ sqrt(3)`` low)."""
    return RMSD(X, Y, backend="numpy")


def gdt_torch(X, Y, cutoffs, weights=None):
    """:func:`GDT` of (B, 3, N) coordinates at ``cutoffs`` (Å), torch out (weights: a weighted mean, a fix)."""
    return GDT(X, Y, cutoffs=cutoffs, weights=weights, backend="torch")


def gdt_numpy(X, Y, cutoffs, weights=None):
    """:func:`gdt_torch`, numpy out."""
    return GDT(X, Y, cutoffs=cutoffs, weights=weights, backend="numpy")


def tmscore_torch(X, Y):
    """:func:`TMscore` of (B, 3, N) coordinates, torch out (d0 clamped at 0.5 Å, a fix)."""
    return TMscore(X, Y, backend="torch")


def tmscore_numpy(X, Y):
    """:func:`TMscore`, numpy out."""
    return TMscore(X, Y, backend="numpy")


# ----------------------------------------------------------------------------------------------------------
# The seed's network / mdtraj helpers
# ----------------------------------------------------------------------------------------------------------

_RCSB_URL = "https://files.rcsb.org/download/{}.pdb"


def download_pdb(name: str, route: str) -> str:
    """Download PDB entry ``name`` (4 characters) from the RCSB to the file ``route``; returns ``route``.

    Needs network access to files.rcsb.org: offline it raises ConnectionError naming the URL (the seed ran
    ``curl`` and silently wrote an empty file).
    """
    import urllib.error
    import urllib.request
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a PDB id such as '1UBQ', got {name!r}")
    url = _RCSB_URL.format(name.strip().upper())
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as error:
        raise ConnectionError(f"download_pdb could not fetch {url} ({error}); it needs network access to "
                              f"files.rcsb.org") from error
    with atomic_open(route, "wb") as handle:
        handle.write(data)
    return route


def _import_mdtraj(caller: str):
    try:
        import mdtraj
    except ImportError as error:
        raise ImportError(f"{caller} needs mdtraj, as the seed's did: pip install mdtraj") from error
    return mdtraj


def clean_pdb(name: str, route: Optional[str] = None, chain_num: Optional[int] = None) -> str:
    """Keep only the atoms of chain ``chain_num`` (0-based chain index; None: all chains) of the PDB file
    ``name`` and write them to ``route`` (default: overwrite ``name``); returns the destination. Needs mdtraj."""
    mdtraj = _import_mdtraj("clean_pdb")
    destin = route if route is not None else name
    raw = mdtraj.load_pdb(name)
    idxs = []
    for chain in raw.topology.chains:
        if chain_num is not None and int(chain_num) != chain.index:
            continue
        idxs.extend(raw.topology.select(f"chainid == {chain.index}").tolist())
    idxs = sorted(idxs)
    if not idxs:
        raise ValueError(f"{name} has no chain {chain_num}")
    prot = mdtraj.Trajectory(xyz=raw.xyz[:, idxs], topology=raw.topology.subset(idxs))
    prot.save(destin)
    return destin


def custom2pdb(coords, proteinnet_id: str, route: str) -> tuple[str, str]:
    """Write ``coords`` onto the topology of the PDB chain named by ``proteinnet_id``
    (``<class>#<pdb_id>_<chain_number>_<chain_id>``): downloads the entry next to ``route``, keeps the chain,
    replaces its coordinates and saves ``route``. Returns (original file, written file). Needs mdtraj and
    network access.

    Args:
        coords: (3, N) or (N, 3) in Å, in the PDB file's atom order; torch or numpy.

    Seed differences (fixes): coordinates are converted from Å to mdtraj's nm (the seed wrote them 10x too
    large), and a (3, N) input is transposed rather than an (N, 3) one.
    """
    mdtraj = _import_mdtraj("custom2pdb")
    xyz, _ = as_tensor("coords", coords)
    xyz = xyz.detach().cpu().to(torch.float64)
    if xyz.dim() != 2 or 3 not in xyz.shape:
        raise ValueError(f"coords must be (3, N) or (N, 3), got {tuple(xyz.shape)}")
    if xyz.shape[1] != 3:
        xyz = xyz.T  # [n, 3]
    pdb_name, chain_num = proteinnet_id.split("#")[-1].split("_")[:2]
    pdb_destin = os.path.join(os.path.dirname(os.fspath(route)), f"{pdb_name}.pdb")
    download_pdb(pdb_name, pdb_destin)
    clean_pdb(pdb_destin, chain_num=int(chain_num) - 1)
    scaffold = mdtraj.load(pdb_destin, top=pdb_destin)
    if scaffold.xyz.shape[1] != xyz.shape[0]:
        raise ValueError(f"coords has {xyz.shape[0]} atoms but chain {chain_num} of {pdb_name} has "
                         f"{scaffold.xyz.shape[1]}")
    scaffold.xyz = (xyz.numpy() / 10.0)[None].astype(np.float32)  # Å -> nm
    scaffold.save(route)
    return pdb_destin, route
