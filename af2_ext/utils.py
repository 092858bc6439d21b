"""Protein structure utilities: distogram -> distances -> 3D coordinates, alignment, metrics, backbone geometry,
the sidechainnet 14-atom layout and PDB output.

Drop-in for ``alphafold2_pytorch.utils`` of alphafold2-pytorch 0.0.19 (the seed): same names, signatures and
conventions. Coordinates for alignment and metrics are the seed's ``(3, N)`` or ``(B, 3, N)``; ``MDScaling``
returns ``(B, 3, N)``. Functions that take arrays accept torch tensors or numpy arrays and return the kind they
were given (``backend="torch" | "numpy"`` forces one, as the seed's ``backend`` keyword did).

The distogram has ``DISTOGRAM_BUCKETS = 37`` classes over ``DISTANCE_THRESHOLDS = linspace(2, 20, 37)`` Å:
class 0 is ``d <= 2``, class ``k`` (1..35) is ``2 + 0.5 (k - 1) < d <= 2 + 0.5 k``, class 36 is ``d > 19.5``
(``get_bucketed_distance_matrix`` is the labelling, ``center_distogram_torch`` its inverse).

Deliberate differences from the seed, each said again where it applies:
- ``center_distogram_torch`` normalises each distribution and rejects negative input (raw logits): softmax
  first, or call ``distogram_to_coords``.
- ``MDScaling`` uses the weighted Guttman transform (``V^+ B(X) X``); the seed's ``B(X) X / N`` is exact only for
  unit weights and shrinks the structure under the distogram's weights. It starts from classical MDS, not a
  random draw, and returns the stress history as ``(B, steps)``.
- ``RMSD`` is ``sqrt(mean_i |a_i - b_i|^2)``; the seed averaged over the 3 coordinates too (``/ sqrt(3)`` low).
- ``GDT`` with ``weights`` is a weighted mean (the seed divided the weighted sum by the number of cutoffs).
- ``TMscore`` clamps ``d0`` at 0.5 Å for short chains as TM-score does (the seed's ``d0`` was <= 0 for L <= 19).
- ``sidechain_container(place_oxygen=True)`` puts O at the CA-C-O bond angle 2.0944 rad; the seed passed that angle
  as its NeRF theta (the supplement), which put O at 60 degrees from CA.
- ``MDScaling`` always returns ``(B, 3, N)``; the seed's returned ``(3, N)`` with ``fix_mirror=0``, which
  ``mdscaling_torch`` / ``mdscaling_numpy`` still do.
- ``custom2pdb`` converts Å to mdtraj's nm (the seed wrote coordinates 10x too large); ``download_pdb`` raises
  ConnectionError offline (the seed's ``curl`` wrote an empty file).
- Unknown mode strings, NaNs and bad shapes raise ``ValueError`` / ``TypeError`` naming the argument.

``TMscore`` and ``GDT`` keep the seed's definitions: the score of the coordinates as given (after ``Kabsch``,
the RMSD-optimal superposition, which understates any model that is not near-perfect). The standard scores,
each under the superposition that maximises it, are ``tm_score`` and ``gdt_ts`` (from
:mod:`af2_ext.structure_scores`).
"""
from __future__ import annotations

import functools
import io
import math
import os
import warnings
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from einops import rearrange, repeat

from af2_ext.fileio import atomic_open
from af2_ext.structure_scores import gdt_ts, tm_score, tm_score_d0

_WARNED: set = set()

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
# Constants
# ----------------------------------------------------------------------------------------------------------

DISTOGRAM_BUCKETS = 37
# The seed's thresholds: the model predicts one class per threshold (see the module docstring for the bins).
DISTANCE_THRESHOLDS = torch.linspace(2, 20, steps=DISTOGRAM_BUCKETS)

# sidechainnet 1.0 layout: 14 atom slots per residue, [N, CA, C, O, side chain..., padding].
NUM_COORDS_PER_RES = 14
GLOBAL_PAD_CHAR = 0
# sidechainnet's vocabulary: tokens 0..19 in this order, 20 = pad "_", 21 = unknown "?".
AA_ORDER = "ACDEFGHIKLMNPQRSTVWY"
PAD_TOKEN = 20
UNK_TOKEN = 21

ONE_TO_THREE_LETTER_MAP = {
    "A": "ALA", "C": "CYS", "D": "ASP", "E": "GLU", "F": "PHE", "G": "GLY", "H": "HIS", "I": "ILE", "K": "LYS",
    "L": "LEU", "M": "MET", "N": "ASN", "P": "PRO", "Q": "GLN", "R": "ARG", "S": "SER", "T": "THR", "V": "VAL",
    "W": "TRP", "Y": "TYR",
}
THREE_TO_ONE_LETTER_MAP = {v: k for k, v in ONE_TO_THREE_LETTER_MAP.items()}

BACKBONE_ATOM_NAMES = ("N", "CA", "C", "O")
# Heavy side-chain atoms in sidechainnet's order (slots 4.. of the 14).
SC_ATOM_NAMES = {
    "ALA": ("CB",),
    "ARG": ("CB", "CG", "CD", "NE", "CZ", "NH1", "NH2"),
    "ASN": ("CB", "CG", "OD1", "ND2"),
    "ASP": ("CB", "CG", "OD1", "OD2"),
    "CYS": ("CB", "SG"),
    "GLN": ("CB", "CG", "CD", "OE1", "NE2"),
    "GLU": ("CB", "CG", "CD", "OE1", "OE2"),
    "GLY": (),
    "HIS": ("CB", "CG", "ND1", "CE1", "NE2", "CD2"),
    "ILE": ("CB", "CG1", "CD1", "CG2"),
    "LEU": ("CB", "CG", "CD1", "CD2"),
    "LYS": ("CB", "CG", "CD", "CE", "NZ"),
    "MET": ("CB", "CG", "SD", "CE"),
    "PHE": ("CB", "CG", "CD1", "CE1", "CZ", "CE2", "CD2"),
    "PRO": ("CB", "CG", "CD"),
    "SER": ("CB", "OG"),
    "THR": ("CB", "OG1", "CG2"),
    "TRP": ("CB", "CG", "CD1", "NE1", "CE2", "CZ2", "CH2", "CZ3", "CE3", "CD2"),
    "TYR": ("CB", "CG", "CD1", "CE1", "CZ", "OH", "CE2", "CD2"),
    "VAL": ("CB", "CG1", "CG2"),
}

# sidechainnet's values for placing the carbonyl oxygen.
BB_BUILD_INFO = {
    "BONDLENS": {"n-ca": 1.442, "ca-c": 1.498, "c-n": 1.379, "c-o": 1.229},
    "BONDANGS": {"ca-c-o": 2.0944},
}

_GDT_CUTOFFS = {"TS": (1.0, 2.0, 4.0, 8.0), "HA": (0.5, 1.0, 2.0, 4.0)}

# ----------------------------------------------------------------------------------------------------------
# Argument helpers
# ----------------------------------------------------------------------------------------------------------


def _as_tensor(name: str, value, *, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, bool]:
    """Tensor view of a torch/numpy argument and whether it was numpy."""
    if isinstance(value, torch.Tensor):
        t, was_numpy = value, False
    elif isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a real numeric array, got dtype {value.dtype}")
        t, was_numpy = torch.from_numpy(np.ascontiguousarray(value)), True
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be real, got {t.dtype}")
    if dtype is not None:
        t = t.to(dtype)
    return t, was_numpy


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    """Compute dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def _check_backend(backend: str) -> str:
    if backend not in ("auto", "torch", "numpy"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numpy', got {backend!r}")
    return backend


def _wants_numpy(backend: str, was_numpy: bool) -> bool:
    return backend == "numpy" or (backend == "auto" and was_numpy)


def _out(t: torch.Tensor, to_numpy: bool, np_dtype=None):
    if not to_numpy:
        return t
    arr = t.detach().cpu().numpy()
    return arr.astype(np_dtype, copy=False) if np_dtype is not None else arr


def _np_float_dtype(value) -> Optional[np.dtype]:
    return value.dtype if isinstance(value, np.ndarray) and value.dtype.kind == "f" else None


def _check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of ``x`` (B, N, 3) -> (B, N, N), exact (no ``|a|^2 + |b|^2 - 2ab`` cancellation) and
    with a zero (not NaN) gradient at coincident points."""
    diff = x[:, :, None, :] - x[:, None, :, :]  # [b, n, n, 3]
    sq = (diff * diff).sum(dim=-1)
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


# ----------------------------------------------------------------------------------------------------------
# Distograms
# ----------------------------------------------------------------------------------------------------------


def get_bucketed_distance_matrix(coords: torch.Tensor, mask: Optional[torch.Tensor] = None,
                                 num_buckets: int = DISTOGRAM_BUCKETS, ignore_index: int = -100) -> torch.Tensor:
    """Distogram class labels of a structure (the training target; see the module docstring for the bins).

    Args:
        coords: (B, N, 3) coordinates in Å.
        mask: optional (B, N) bool, True = residue present; pairs with an absent residue get ``ignore_index``.
        num_buckets: number of classes; the thresholds are ``linspace(2, 20, num_buckets)``.
        ignore_index: label of masked pairs.

    Returns:
        (B, N, N) int64 labels in ``[0, num_buckets)`` (or ``ignore_index``).
    """
    if not isinstance(coords, torch.Tensor) or coords.dim() != 3 or coords.shape[-1] != 3:
        raise ValueError(f"coords must be a (B, N, 3) tensor, got {getattr(coords, 'shape', type(coords))}")
    _check_finite("coords", coords)
    num_buckets = _check_int("num_buckets", num_buckets, minimum=2)
    coords = coords.to(_float_dtype(coords))
    distances = _pairwise_distances(coords)
    boundaries = torch.linspace(2, 20, steps=num_buckets, device=coords.device, dtype=coords.dtype)
    labels = torch.bucketize(distances, boundaries[:-1])
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(coords.shape[:2]):
            raise ValueError(f"mask must be a (B, N) = {tuple(coords.shape[:2])} bool tensor, "
                             f"got {getattr(mask, 'shape', type(mask))}")
        mask = mask.bool()
        labels = labels.masked_fill(~(mask[:, :, None] & mask[:, None, :]), ignore_index)
    return labels


def _bin_centers(bins: torch.Tensor, min_t: float) -> torch.Tensor:
    """Distance each class stands for: the middle of its interval; class 0 spans [min_t, bins[0]]; the last
    class (beyond the thresholds) gets the seed's ``1.33 * bins[-1]``."""
    centers = torch.empty_like(bins)
    centers[0] = 0.5 * (min_t + bins[0])
    centers[1:-1] = 0.5 * (bins[:-2] + bins[1:-1])
    centers[-1] = 1.33 * bins[-1]
    return centers


def center_distogram_torch(distogram: torch.Tensor, bins=DISTANCE_THRESHOLDS, min_t: float = 1.,
                           center: str = "mean", wide: Optional[str] = "std") -> tuple[torch.Tensor, torch.Tensor]:
    """Central distance and confidence weight of each pair of a distogram.

    Args:
        distogram: (B, N, N, K) or (N, N, K) probabilities over the K classes (each distribution is
            normalised here). A distogram with negative entries is taken as logits and softmaxed, with a
            one-time warning (the seed README passes the model's logits; the seed used them as they were).
        bins: (K,) increasing thresholds, the seed's ``DISTANCE_THRESHOLDS``. Class 0 stands for
            ``(min_t + bins[0]) / 2``, class k for the middle of ``(bins[k-1], bins[k]]``, the last class for
            "beyond ``bins[-2]``".
        min_t: lower bound of the first class, in Å (the seed's first center 1.5 Å is ``(1 + 2) / 2``).
        center: "mean" (expected distance) or "median" (center of the class holding the median).
        wide: spread used for the weights: "std", "var", or None for none (all weights 1).

    Returns:
        distances: (B, N, N) central estimate, 0 on the diagonal.
        weights: (B, N, N) ``1 / (1 + spread)`` in (0, 1]; 0 on the diagonal, for pairs whose central estimate
            is beyond ``bins[-2]`` (the last, open class) and for all-zero distributions.
    """
    if not isinstance(distogram, torch.Tensor):
        raise TypeError(f"distogram must be a torch.Tensor, got {type(distogram).__name__}")
    if distogram.dim() == 3:
        distogram = distogram.unsqueeze(0)  # [1, n, n, k]
    if distogram.dim() != 4 or distogram.shape[1] != distogram.shape[2]:
        raise ValueError(f"distogram must be (B, N, N, K), got {tuple(distogram.shape)}")
    if center not in ("mean", "median"):
        raise ValueError(f"center must be 'mean' or 'median', got {center!r}")
    if wide not in ("std", "var", None):
        raise ValueError(f"wide must be 'std', 'var' or None, got {wide!r}")
    _check_finite("distogram", distogram)
    if bool((distogram < 0).any()):
        # Negative entries cannot be probabilities: these are logits, as the seed README passes the model's
        # output straight in. Softmax them (the seed used them as they were, which gave garbage distances).
        if "center_distogram_logits" not in _WARNED:
            _WARNED.add("center_distogram_logits")
            warnings.warn("center_distogram_torch: the distogram has negative entries, so it is taken as logits "
                          "and softmaxed; pass probabilities or use distogram_to_coords to silence this",
                          RuntimeWarning, stacklevel=2)
        distogram = distogram.float().softmax(dim=-1)
    dtype = _float_dtype(distogram)
    distogram = distogram.to(dtype)
    bins = torch.as_tensor(bins, dtype=dtype, device=distogram.device)
    if bins.dim() != 1 or bins.numel() != distogram.shape[-1] or bins.numel() < 2:
        raise ValueError(f"bins must be 1-D with one threshold per distogram class ({distogram.shape[-1]}), "
                         f"got shape {tuple(bins.shape)}")
    if not bool((bins[1:] > bins[:-1]).all()):
        raise ValueError("bins must be strictly increasing")
    if not min_t < float(bins[0]):
        raise ValueError(f"min_t must be below bins[0] = {float(bins[0])}, got {min_t}")
    centers = _bin_centers(bins, float(min_t))

    mass = distogram.sum(dim=-1, keepdim=True)
    has_mass = mass > 0
    probs = distogram / torch.where(has_mass, mass, torch.ones_like(mass))
    if center == "mean":
        central = (probs * centers).sum(dim=-1)
    else:
        cumulative = probs.cumsum(dim=-1)
        half = torch.full_like(cumulative[..., :1], 0.5)
        index = torch.searchsorted(cumulative.contiguous(), half).clamp_max(bins.numel() - 1)
        central = centers[index.squeeze(-1)]
    if wide is None:
        spread = torch.zeros_like(central)
    else:
        spread = (probs * (centers - central.unsqueeze(-1)) ** 2).sum(dim=-1)
        if wide == "std":  # sqrt with a zero (not inf) gradient at a zero spread (one-hot rows)
            positive = spread > 0
            spread = torch.where(positive, torch.where(positive, spread, torch.ones_like(spread)).sqrt(),
                                 torch.zeros_like(spread))

    n = distogram.shape[1]
    diagonal = torch.eye(n, dtype=torch.bool, device=distogram.device)
    has_mass = has_mass.squeeze(-1)
    keep = (central <= bins[-2]) & has_mass & ~diagonal
    central = central.masked_fill(~has_mass | diagonal, 0.0)
    weights = torch.where(keep, 1.0 / (1.0 + spread), torch.zeros_like(spread))
    return central, weights


# ----------------------------------------------------------------------------------------------------------
# Distances -> coordinates (metric MDS)
# ----------------------------------------------------------------------------------------------------------


def _classical_mds(dist: torch.Tensor) -> torch.Tensor:
    """Torgerson's classical MDS: (B, N, N) distances -> (B, N, 3) coordinates (the SMACOF start)."""
    sq = dist.square()
    sq = 0.5 * (sq + sq.transpose(-1, -2))
    gram = -0.5 * (sq - sq.mean(dim=-1, keepdim=True) - sq.mean(dim=-2, keepdim=True)
                   + sq.mean(dim=(-1, -2), keepdim=True))
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    k = min(3, dist.shape[-1])
    top_values = eigenvalues[..., -k:].flip(-1).clamp_min(0)
    top_vectors = eigenvectors[..., -k:].flip(-1)
    coords = top_vectors * top_values.sqrt().unsqueeze(-2)  # [b, n, k]
    if k < 3:
        coords = torch.cat([coords, coords.new_zeros(*coords.shape[:-1], 3 - k)], dim=-1)  # [b, n, 3]
    return coords


def _smacof(delta: torch.Tensor, weights: torch.Tensor, coords: torch.Tensor, iters: int, tol: float,
            verbose: int, stress_unit: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted SMACOF (de Leeuw; Borg & Groenen, Modern Multidimensional Scaling, ch. 8).

    Minimises ``stress(X) = 1/2 sum_ij w_ij (|x_i - x_j| - delta_ij)^2`` by Guttman transforms
    ``X <- V^+ B(X) X``; each step cannot increase the stress. Asymmetric ``delta`` / ``weights`` are handled
    exactly (the stress only sees their symmetric parts). Stops when every structure's relative stress decrease
    is <= ``tol``.

    Args:
        delta, weights: (B, N, N). coords: (B, N, 3) start.
        stress_unit: optional (B,) float64 factor that turns a stress into the caller's units (for ``verbose``).

    Returns:
        coords (B, N, 3) and the stress of each iterate, (B, steps); the last column is the returned coords'.
    """
    n = delta.shape[-1]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=delta.device)
    weights = weights * off_diagonal
    w_sym = 0.5 * (weights + weights.transpose(-1, -2))
    wd = weights * delta
    wd_sym = 0.5 * (wd + wd.transpose(-1, -2))
    v = torch.diag_embed(w_sym.sum(dim=-1)) - w_sym
    # Depends on the weights only: one pseudo-inverse per structure (rank n - 1 when the weight graph is connected).
    v_pinv = torch.linalg.pinv(v, hermitian=True)

    history = []
    previous = None
    for step in range(iters + 1):
        dist = _pairwise_distances(coords)
        stress = 0.5 * (weights * (dist - delta).square()).sum(dim=(-1, -2))
        history.append(stress)
        reported = stress.detach().double() * (1.0 if stress_unit is None else stress_unit)
        if verbose >= 2:
            print(f"MDScaling it {step}: stress {reported.tolist()}")
        if previous is not None:
            decrease = (previous - stress) / previous.clamp_min(torch.finfo(stress.dtype).tiny)
            if bool((decrease <= tol).all()):
                if verbose:
                    print(f"MDScaling: converged at iteration {step}, stress {reported.tolist()}")
                break
        if step == iters:
            break
        positive = dist > 0
        ratio = torch.where(positive, wd_sym / torch.where(positive, dist, torch.ones_like(dist)),
                            torch.zeros_like(dist))
        guttman = torch.diag_embed(ratio.sum(dim=-1)) - ratio
        coords = v_pinv @ (guttman @ coords)
        previous = stress
    return coords, torch.stack(history, dim=-1)


def MDScaling(pre_dist_mat, weights=None, iters: int = 10, tol: float = 1e-5, fix_mirror: int = 0,
              N_mask=None, CA_mask=None, C_mask=None, verbose: int = 0, *, backend: str = "auto"):
    """3D coordinates whose distances best match ``pre_dist_mat`` (weighted metric MDS by SMACOF).

    Args:
        pre_dist_mat: (B, N, N) or (N, N) target distances in Å, torch or numpy; non-negative, finite.
        weights: optional (B, N, N) or (N, N) non-negative confidence per pair (``center_distogram_torch``'s);
            0 ignores a pair. Default all 1.
        iters: maximum number of SMACOF updates (0 returns the classical-MDS start).
        tol: stop when every structure's relative stress decrease in one update is <= tol.
        fix_mirror: > 0 picks the chirality: MDS cannot tell a structure from its mirror image, so if most
            backbone phi angles (from ``N_mask`` / ``CA_mask`` / ``C_mask``) come out positive, the z axis is
            flipped (real proteins have mostly negative phi). Seed semantics.
        N_mask, CA_mask: bool (N,) or (B, N) masks of the backbone N / CA points; required when fix_mirror > 0.
        C_mask: same for C; default: the points that are neither N nor CA (``scn_backbone_mask(l_aa=3)`` order).
        verbose: 1 reports convergence, 2 every iteration.
        backend: "auto" (same kind as ``pre_dist_mat``), "torch" or "numpy" for the outputs.

    Returns:
        coords: (B, 3, N) (the seed's layout), centered at the origin.
        stresses: (B, steps) the stress after each step, ``stresses[:, -1]`` being the returned coords'.
            Seed difference: the seed returned a flat history of its normalised stress.

    Seed difference: coords are (B, 3, N) for every ``fix_mirror``; the seed returned (3, N) with
    ``fix_mirror=0`` (:func:`mdscaling_torch` keeps that shape).

    Seed differences: the weighted Guttman transform ``V^+ B(X) X`` (the seed's ``B(X) X / N`` is only right for
    unit weights and shrinks the structure under distogram weights), a deterministic classical-MDS start instead
    of a random one, and degenerate input (all-zero distances or weights, a single point) gives finite output.

    Any finite distances work: each structure is fitted with its distances scaled by a power of two into
    [0.5, 1) (exact; the fit is scale-equivariant) and scaled back, so squares neither overflow nor underflow.
    Only when the coordinates or stresses in the input's units are beyond its dtype (stresses are squared
    distances: float32 distances of 1e17 Å and more that no structure fits exactly, say) does a ValueError name
    ``pre_dist_mat`` and ask for float64.
    """
    backend = _check_backend(backend)
    dist, was_numpy = _as_tensor("pre_dist_mat", pre_dist_mat)
    np_dtype = _np_float_dtype(pre_dist_mat)
    if dist.dim() == 2:
        dist = dist.unsqueeze(0)  # [1, n, n]
    if dist.dim() != 3 or dist.shape[1] != dist.shape[2] or dist.shape[1] == 0:
        raise ValueError(f"pre_dist_mat must be (B, N, N) or (N, N) with N >= 1, got {tuple(dist.shape)}")
    _check_finite("pre_dist_mat", dist)
    if bool((dist < 0).any()):
        raise ValueError("pre_dist_mat must be non-negative distances")
    dist = dist.to(_float_dtype(dist))
    if weights is None:
        w = torch.ones_like(dist)
    else:
        w, _ = _as_tensor("weights", weights)
        w = w.to(dtype=dist.dtype, device=dist.device)
        if w.dim() == 2:
            w = w.unsqueeze(0)  # [1, n, n]
        if w.dim() != 3 or w.shape[1:] != dist.shape[1:] or w.shape[0] not in (1, dist.shape[0]):
            raise ValueError(f"weights must have pre_dist_mat's shape {tuple(dist.shape)}, got {tuple(w.shape)}")
        _check_finite("weights", w)
        if bool((w < 0).any()):
            raise ValueError("weights must be non-negative")
        w = w.expand_as(dist)
    iters = _check_int("iters", iters, minimum=0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a float >= 0, got {tol!r}")
    fix_mirror = _check_int("fix_mirror", int(fix_mirror) if isinstance(fix_mirror, bool) else fix_mirror,
                            minimum=0)
    verbose = _check_int("verbose", int(verbose) if isinstance(verbose, bool) else verbose, minimum=0)
    if fix_mirror and (N_mask is None or CA_mask is None):
        raise ValueError("N_mask and CA_mask are required when fix_mirror > 0")

    # Fit in units where each structure's largest distance is in [0.5, 1): 2^-exponent scales exactly.
    largest = dist.detach().amax(dim=(-1, -2)).double()  # [b]
    exponent = torch.where(largest > 0, torch.frexp(largest).exponent, torch.zeros_like(largest, dtype=torch.int32))
    unit = torch.pow(2.0, exponent.double())  # [b] float64: 2^exponent is exact there for every float32/64 input
    scaled = (dist.double() / unit[:, None, None]).to(dist.dtype)
    with torch.no_grad():
        start = _classical_mds(scaled)  # [b, n, 3]
    coords, stresses = _smacof(scaled, w, start, iters, float(tol), verbose, stress_unit=unit.square())
    coords = (coords.double() * unit[:, None, None]).to(dist.dtype)
    stresses = (stresses.double() * unit[:, None].square()).to(dist.dtype)
    if not (bool(torch.isfinite(coords).all()) and bool(torch.isfinite(stresses).all())):
        raise ValueError(f"pre_dist_mat: distances up to {float(largest.max()):.3g} give coordinates or stresses "
                         f"(squared distances) beyond {dist.dtype}'s range; pass float64 distances (or rescale "
                         f"them)")
    coords = rearrange(coords, "b n d -> b d n")  # [b, 3, n]
    if fix_mirror:
        negative_share = calc_phis_torch(coords, N_mask, CA_mask, C_mask, prop=True)  # [b]
        flip = (negative_share < 0.5).to(coords.device)  # NaN (no phi) -> no flip
        sign = torch.ones(coords.shape[0], 3, 1, dtype=coords.dtype, device=coords.device)
        sign[:, 2, 0] = torch.where(flip, -1.0, 1.0).to(coords.dtype)
        coords = coords * sign
        if verbose >= 2:
            print(f"MDScaling: mirrored structures {torch.nonzero(flip).flatten().tolist()}")
    to_numpy = _wants_numpy(backend, was_numpy)
    return _out(coords, to_numpy, np_dtype), _out(stresses, to_numpy, np_dtype)


# ----------------------------------------------------------------------------------------------------------
# Backbone geometry
# ----------------------------------------------------------------------------------------------------------


def get_dihedral_torch(c1, c2, c3, c4):
    """Dihedral angle c1-c2-c3-c4 in radians, in (-pi, pi], IUPAC sign (positive = clockwise looking along
    c2 -> c3); the atan2 form of https://en.wikipedia.org/wiki/Dihedral_angle#In_polymer_physics.

    Args:
        c1, c2, c3, c4: (..., 3) points, broadcastable; torch (or numpy, then numpy out).

    Returns:
        (...) angles; 0 for degenerate (collinear) geometry.
    """
    points = [_as_tensor(name, c) for name, c in (("c1", c1), ("c2", c2), ("c3", c3), ("c4", c4))]
    was_numpy = all(p[1] for p in points)
    dtype = torch.float64 if any(p[0].dtype == torch.float64 for p in points) else torch.float32
    c1, c2, c3, c4 = (p[0].to(dtype) for p in points)
    for name, c in (("c1", c1), ("c2", c2), ("c3", c3), ("c4", c4)):
        if c.dim() == 0 or c.shape[-1] != 3:
            raise ValueError(f"{name} must be (..., 3), got {tuple(c.shape)}")
    c1, c2, c3, c4 = torch.broadcast_tensors(c1, c2, c3, c4)
    b1, b2, b3 = c2 - c1, c3 - c2, c4 - c3
    n1 = torch.linalg.cross(b1, b2, dim=-1)
    n2 = torch.linalg.cross(b2, b3, dim=-1)
    y = (b2.norm(dim=-1, keepdim=True) * b1 * n2).sum(dim=-1)
    x = (n1 * n2).sum(dim=-1)
    return _out(torch.atan2(y, x), was_numpy)


def nerf_torch(a, b, c, l, theta, chi):
    """Natural Extension of Reference Frame (Parsons et al. 2005) in the seed's convention: the point
    ``d = c + l * R @ [cos(theta), sin(theta) cos(chi), sin(theta) sin(chi)]``, R's first column along ``c - b``.

    So ``|d - c| = l``, ``theta`` is the angle between ``c - b`` and ``d - c`` (the supplement of the b-c-d bond
    angle: pass ``pi - bond_angle``) and ``chi`` the dihedral ``a-b-c-d`` (``get_dihedral_torch``'s sign).

    Args:
        a, b, c: (..., 3) the three previous points.
        l: bond length(s), float or (...) tensor.
        theta: angle(s) in radians, every one within [-pi, pi] (else ValueError, as the seed), float or tensor.
        chi: dihedral(s) in radians, float or (...) tensor.

    Returns:
        d: (..., 3).
    """
    a, _ = _as_tensor("a", a)
    b, _ = _as_tensor("b", b)
    c, _ = _as_tensor("c", c)
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype, c.dtype) else torch.float32
    a, b, c = a.to(dtype), b.to(dtype), c.to(dtype)
    for name, p in (("a", a), ("b", b), ("c", c)):
        if p.dim() == 0 or p.shape[-1] != 3:
            raise ValueError(f"{name} must be (..., 3), got {tuple(p.shape)}")
    l, theta, chi = (torch.as_tensor(v, dtype=dtype, device=c.device) for v in (l, theta, chi))
    if not bool(((theta >= -math.pi) & (theta <= math.pi)).all()):
        raise ValueError(f"theta must be in radians within [-pi, pi], got {theta}")
    for name, v in (("l", l), ("theta", theta), ("chi", chi)):
        _check_finite(name, v)
    l, theta, chi = torch.broadcast_tensors(l, theta, chi)
    a, b, c = torch.broadcast_tensors(a, b, c)
    bc = torch.nn.functional.normalize(c - b, dim=-1)
    normal = torch.nn.functional.normalize(torch.linalg.cross(b - a, bc, dim=-1), dim=-1)
    frame = torch.stack([bc, torch.linalg.cross(normal, bc, dim=-1), normal], dim=-1)  # [..., 3, 3] columns
    local = torch.stack([l * torch.cos(theta),
                         l * torch.sin(theta) * torch.cos(chi),
                         l * torch.sin(theta) * torch.sin(chi)], dim=-1)  # [..., 3]
    return c + (frame @ local.unsqueeze(-1)).squeeze(-1)


def _backbone_masks(name: str, mask, batch: int, n: int, device) -> torch.Tensor:
    """A bool (N,) / (1, N) / (B, N) mask (or 1-D index array) -> (B, N) bool."""
    t, _ = _as_tensor(name, mask)
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.dim() != 1:
            raise TypeError(f"{name} must be a bool mask or a 1-D integer index array, got {t.dtype} "
                            f"{tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"{name} indices must be in [0, {n})")
        index = t.long()
        t = torch.zeros(n, dtype=torch.bool)
        t[index] = True
    t = t.to(device)
    if t.dim() == 1:
        t = t.unsqueeze(0)  # [1, n]
    if t.dim() != 2 or t.shape[1] != n or t.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be (N,) or (B, N) with N = {n}, B = {batch}, got {tuple(t.shape)}")
    return t.expand(batch, n)


def calc_phis_torch(pred_coords, N_mask, CA_mask, C_mask=None, prop: bool = True, verbose: int = 0):
    """Backbone phi angles ``C(i-1), N(i), CA(i), C(i)`` of each structure, or the share that is negative.

    Args:
        pred_coords: (B, 3, N) or (3, N) coordinates.
        N_mask, CA_mask: bool (N,) or (B, N) masks (or 1-D index arrays) of the backbone N / CA points.
        C_mask: same for C; default: the points that are neither N nor CA.
        prop: return the share of negative phis (B,) instead of the angles.
        verbose: unused (seed signature).

    Returns:
        prop=True: (B,) share of phi < 0 (NaN for a structure with fewer than two residues).
        prop=False: list of B tensors (R - 1,), R the number of residues.
    """
    coords, was_numpy = _as_tensor("pred_coords", pred_coords)
    if coords.dim() == 2:
        coords = coords.unsqueeze(0)  # [1, 3, n]
    if coords.dim() != 3 or coords.shape[1] != 3:
        raise ValueError(f"pred_coords must be (B, 3, N), got {tuple(coords.shape)}")
    batch, _, n = coords.shape
    n_mask = _backbone_masks("N_mask", N_mask, batch, n, coords.device)
    ca_mask = _backbone_masks("CA_mask", CA_mask, batch, n, coords.device)
    c_mask = ~(n_mask | ca_mask) if C_mask is None else _backbone_masks("C_mask", C_mask, batch, n, coords.device)
    points = rearrange(coords.detach(), "b d n -> b n d")  # [b, n, 3]
    phis = []
    for i in range(batch):
        n_atoms, ca_atoms, c_atoms = points[i][n_mask[i]], points[i][ca_mask[i]], points[i][c_mask[i]]
        if not len(n_atoms) == len(ca_atoms) == len(c_atoms):
            raise ValueError(f"N_mask, CA_mask and C_mask must select as many atoms each, got {len(n_atoms)}, "
                             f"{len(ca_atoms)}, {len(c_atoms)} in structure {i}")
        phis.append(get_dihedral_torch(c_atoms[:-1], n_atoms[1:], ca_atoms[1:], c_atoms[1:]))
    if not prop:
        return [_out(p, was_numpy) for p in phis]
    share = torch.stack([(p < 0).to(coords.dtype if coords.is_floating_point() else torch.float32).mean()
                         if p.numel() else torch.tensor(float("nan"), device=coords.device) for p in phis])
    return _out(share, was_numpy)


# ----------------------------------------------------------------------------------------------------------
# Alignment and metrics (coords (3, N) or (B, 3, N))
# ----------------------------------------------------------------------------------------------------------


def _pair(A, B, *, batched: bool) -> tuple[torch.Tensor, torch.Tensor, bool, Optional[np.dtype]]:
    a, a_numpy = _as_tensor("A", A)
    b, b_numpy = _as_tensor("B", B)
    if a.shape != b.shape:
        raise ValueError(f"A and B must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 2 or a.shape[-2] != 3 or a.shape[-1] == 0 or (batched and a.dim() > 3):
        expected = "(3, N) or (B, 3, N)" if batched else "(..., 3, N)"
        raise ValueError(f"A and B must be {expected} with N >= 1, got {tuple(a.shape)}")
    if a.device != b.device:
        raise ValueError(f"A and B must be on the same device, got {a.device} and {b.device}")
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    _check_finite("A", a)
    _check_finite("B", b)
    if batched and a.dim() == 2:
        a, b = a.unsqueeze(0), b.unsqueeze(0)  # [1, 3, n]
    return a, b, a_numpy and b_numpy, _np_float_dtype(A)


def Kabsch(A, B, *, backend: str = "auto"):
    """Optimal rotation of A onto B (Kabsch 1976; proper rotations only, never a reflection).

    Args:
        A, B: (3, N) or (..., 3, N) coordinates, the same shape.

    Returns:
        (A_aligned, B_centered), both (..., 3, N): A centered and rotated, B centered, as the seed returns.
        The rotation is computed without gradient (as the seed); gradients flow through the coordinates.
    """
    backend = _check_backend(backend)
    a, b, was_numpy, np_dtype = _pair(A, B, batched=False)
    a_centered = a - a.mean(dim=-1, keepdim=True)
    b_centered = b - b.mean(dim=-1, keepdim=True)
    with torch.no_grad():
        covariance = a_centered @ b_centered.transpose(-1, -2)  # [..., 3, 3]
        u, _, vh = torch.linalg.svd(covariance)
        det = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
        det = torch.where(det == 0, torch.ones_like(det), det)
        correction = torch.diag_embed(torch.stack([torch.ones_like(det), torch.ones_like(det), det], dim=-1))
        rotation = vh.transpose(-1, -2) @ correction @ u.transpose(-1, -2)
    aligned = rotation @ a_centered
    to_numpy = _wants_numpy(backend, was_numpy)
    return _out(aligned, to_numpy, np_dtype), _out(b_centered, to_numpy, np_dtype)


def RMSD(A, B, *, backend: str = "auto"):
    """Root-mean-square deviation ``sqrt(mean_i |a_i - b_i|^2)`` of already aligned coordinates.

    Args:
        A, B: (3, N) or (B, 3, N).

    Returns:
        (B,) (``(1,)`` for unbatched input, as the seed).

    Seed difference: the seed averaged over the 3 coordinates as well, reporting ``RMSD / sqrt(3)``.
    """
    backend = _check_backend(backend)
    a, b, was_numpy, np_dtype = _pair(A, B, batched=True)
    rmsd = (a - b).square().sum(dim=-2).mean(dim=-1).sqrt()
    return _out(rmsd, _wants_numpy(backend, was_numpy), np_dtype)


# The seed's default list; GDT tells "not given" (mode decides) from an explicit list by identity.
_SEED_GDT_CUTOFFS = [1, 2, 4, 8]


def GDT(A, B, *, mode: str = "TS", cutoffs=_SEED_GDT_CUTOFFS, weights=None, backend: str = "auto"):
    """Global distance test of already aligned coordinates: the (weighted) mean over cutoffs of the share of
    points within the cutoff (no superposition search, as the seed).

    Args:
        A, B: (3, N) or (B, 3, N).
        mode: "TS" (cutoffs 1, 2, 4, 8 Å) or "HA" (0.5, 1, 2, 4 Å).
        cutoffs: explicit cutoffs in Å, overriding ``mode``; the default (the seed's ``[1, 2, 4, 8]`` object) or
            None lets ``mode`` decide (the seed always let ``mode`` decide).
        weights: optional weight per cutoff (a scalar applies to all).

    Returns:
        (B,) in [0, 1].

    Seed difference: with ``weights`` the seed divided the weighted sum by the number of cutoffs.
    """
    backend = _check_backend(backend)
    if not isinstance(mode, str) or mode.upper() not in _GDT_CUTOFFS:
        raise ValueError(f"mode must be 'TS' or 'HA', got {mode!r}")
    a, b, was_numpy, np_dtype = _pair(A, B, batched=True)
    cutoffs = _GDT_CUTOFFS[mode.upper()] if cutoffs is None or cutoffs is _SEED_GDT_CUTOFFS else cutoffs
    cutoffs = torch.as_tensor(cutoffs, dtype=a.dtype, device=a.device).flatten()
    if cutoffs.numel() == 0 or not bool((cutoffs > 0).all()):
        raise ValueError("cutoffs must be a non-empty sequence of positive distances")
    if weights is None:
        w = torch.ones_like(cutoffs)
    else:
        w = torch.as_tensor(weights, dtype=a.dtype, device=a.device).flatten()
        if w.numel() == 1:
            w = w.expand_as(cutoffs)
        if w.shape != cutoffs.shape or not bool((w >= 0).all()) or not float(w.sum()) > 0:
            raise ValueError(f"weights must be one non-negative weight per cutoff ({cutoffs.numel()}) with a "
                             f"positive sum, got {weights!r}")
    dist = (a - b).square().sum(dim=-2).sqrt()  # [b, n]
    within = (dist.unsqueeze(-1) <= cutoffs).to(a.dtype).mean(dim=-2)  # [b, k]
    return _out((within * w).sum(dim=-1) / w.sum(), _wants_numpy(backend, was_numpy), np_dtype)


def TMscore(A, B, *, backend: str = "auto"):
    """TM-score of already aligned coordinates, ``mean_i 1 / (1 + (d_i / d0)^2)`` with
    ``d0 = 1.24 (L - 15)^(1/3) - 1.8`` for L > 21 and at least 0.5 Å (Zhang & Skolnick 2004, TM-score's d0),
    L = N. No superposition search (as the seed).

    Args:
        A, B: (3, N) or (B, 3, N).

    Returns:
        (B,) in (0, 1]; 1 for identical coordinates.

    Seed difference: the seed's d0 went to <= 0 (NaN / negative scores) for L <= 19.
    """
    backend = _check_backend(backend)
    a, b, was_numpy, np_dtype = _pair(A, B, batched=True)
    length = a.shape[-1]
    d0 = max(0.5, 1.24 * (length - 15) ** (1.0 / 3.0) - 1.8) if length > 21 else 0.5
    dist_sq = (a - b).square().sum(dim=-2)  # [b, n]
    score = (1.0 / (1.0 + dist_sq / d0 ** 2)).mean(dim=-1)
    return _out(score, _wants_numpy(backend, was_numpy), np_dtype)


# ----------------------------------------------------------------------------------------------------------
# sidechainnet 14-atom layout
# ----------------------------------------------------------------------------------------------------------


def _cloud_table() -> torch.Tensor:
    """(22, 14) bool: atom slots present for each sidechainnet token (pad: none, unknown: backbone only)."""
    table = torch.zeros(UNK_TOKEN + 1, NUM_COORDS_PER_RES, dtype=torch.bool)
    for token, letter in enumerate(AA_ORDER):
        table[token, : 4 + len(SC_ATOM_NAMES[ONE_TO_THREE_LETTER_MAP[letter]])] = True
    table[UNK_TOKEN, :4] = True
    return table


_CLOUD_TABLE = _cloud_table()


def _int_tokens(name: str, value) -> torch.Tensor:
    t, _ = _as_tensor(name, value)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer tokens, got {t.dtype}")
    return t.long()


def scn_backbone_mask(scn_seq, boolean: bool = True, l_aa: int = NUM_COORDS_PER_RES, *, c_mask: bool = False):
    """Masks of the backbone N and CA points in a flattened ``l_aa``-atoms-per-residue cloud (the seed's call).

    Atoms are ordered [N, CA, C, ...] in each residue: N is slot 0, CA slot 1, C slot 2 (``l_aa = 14`` for the
    sidechainnet layout, the default; 3 for N/CA/C backbones, 4 with CB).

    Args:
        scn_seq: (L,) or (B, L) sequence, tensor or array; only its shape is used (as the seed).
        boolean: return bool masks (else ``torch.nonzero`` indices of each mask).
        l_aa: atoms per residue, >= 2 (>= 3 with ``c_mask``).
        c_mask: keyword-only, not in the seed: also return the C mask, as a third element.

    Returns:
        (N_mask, CA_mask) (or (N_mask, CA_mask, C_mask)), each (..., L * l_aa) bool, or the nonzero indices.
    """
    if isinstance(scn_seq, torch.Tensor):
        shape, device = tuple(scn_seq.shape), scn_seq.device
    elif isinstance(scn_seq, np.ndarray):
        shape, device = scn_seq.shape, torch.device("cpu")
    else:
        raise TypeError(f"scn_seq must be a torch.Tensor or numpy.ndarray, got {type(scn_seq).__name__}")
    l_aa = _check_int("l_aa", l_aa, minimum=3 if c_mask else 2)
    if len(shape) not in (1, 2):
        raise ValueError(f"scn_seq must be (L,) or (B, L), got {shape}")
    slot = torch.arange(l_aa, device=device).expand(*shape, l_aa)  # [..., l, l_aa]
    slot = rearrange(slot, "... l c -> ... (l c)")  # [..., l*l_aa]
    masks = (slot == 0, slot == 1, slot == 2) if c_mask else (slot == 0, slot == 1)
    if boolean:
        return masks
    return tuple(torch.nonzero(m) for m in masks)


def scn_cloud_mask(scn_seq, boolean: bool = True, *, coords=None):
    """Which of the 14 sidechainnet atom slots each residue has.

    Args:
        scn_seq: (L,) or (B, L) sidechainnet tokens (0..19 = ``AA_ORDER``, 20 pad, 21 unknown: backbone only).
        boolean: return the bool mask (else its ``torch.nonzero`` indices).
        coords: keyword-only, not in the seed: optional (B, L*14, 3) or (B, L, 14, 3) sidechainnet
            coordinates: then the mask is "slot has a
            nonzero coordinate" (the atoms actually present) and ``scn_seq`` is not read.

    Returns:
        (B, L, 14) bool (or the nonzero indices).
    """
    if coords is not None:
        c, _ = _as_tensor("coords", coords)
        if c.dim() == 2:
            c = c.unsqueeze(0)  # [1, l*14, 3]
        if c.dim() == 3:
            if c.shape[-1] != 3 or c.shape[1] % NUM_COORDS_PER_RES:
                raise ValueError(f"coords must be (B, L*14, 3) or (B, L, 14, 3), got {tuple(c.shape)}")
            c = rearrange(c, "b (l c) d -> b l c d", c=NUM_COORDS_PER_RES)  # [b, l, 14, 3]
        if c.dim() != 4 or c.shape[-2:] != (NUM_COORDS_PER_RES, 3):
            raise ValueError(f"coords must be (B, L*14, 3) or (B, L, 14, 3), got {tuple(c.shape)}")
        mask = (c != 0).any(dim=-1)
    else:
        seq = _int_tokens("scn_seq", scn_seq)
        if seq.dim() == 1:
            seq = seq.unsqueeze(0)  # [1, l]
        if seq.dim() != 2:
            raise ValueError(f"scn_seq must be (L,) or (B, L), got {tuple(seq.shape)}")
        if seq.numel() and (int(seq.min()) < 0 or int(seq.max()) > UNK_TOKEN):
            raise ValueError(f"scn_seq tokens must be in [0, {UNK_TOKEN}], got [{int(seq.min())}, {int(seq.max())}]")
        mask = _CLOUD_TABLE.to(seq.device)[seq]  # [b, l, 14]
    return mask if boolean else torch.nonzero(mask)


def sidechain_container(backbones, place_oxygen: bool = False, n_atoms: int = NUM_COORDS_PER_RES,
                        padding: float = GLOBAL_PAD_CHAR, *, n_aa: int = 3, cloud_mask=None) -> torch.Tensor:
    """Backbone -> sidechainnet-layout coordinates (differentiable), the seed's call.

    Slots 0-2 get N, CA, C; slot 3 (O) gets the carbonyl oxygen placed by NeRF from psi when ``place_oxygen``
    (bond 1.229 Å, bond angle CA-C-O 2.0944, dihedral N-CA-C-O = psi - pi; psi of the last residue taken as
    5pi/4, as the seed), else C; slots 4.. get C as the seed (``n_aa = 3``), or the 4th point (CB, ``n_aa = 4``).

    Args:
        backbones: (B, L * n_aa, 3) points per residue (N, CA, C[, CB]).
        place_oxygen: compute O (else O = C).
        n_atoms: atom slots per residue (>= 4; sidechainnet: 14).
        padding: value of slots outside ``cloud_mask``.
        n_aa: keyword-only, not in the seed: 3 (N, CA, C) or 4 (N, CA, C, CB) points per residue.
        cloud_mask: keyword-only, not in the seed: optional (B, L, n_atoms) bool; slots outside it are set to
            ``padding``.

    Returns:
        (B, L, n_atoms, 3).

    Seed difference (a fix): the seed passed the CA-C-O bond angle as NeRF's theta, which is its supplement, so
    its O sat at 60 degrees from CA; here CA-C-O is 2.0944 rad (120 degrees) and each structure uses its own psi.
    """
    bb, _ = _as_tensor("backbones", backbones)
    if n_aa not in (3, 4) or isinstance(n_aa, bool):
        raise ValueError(f"n_aa must be 3 (N, CA, C) or 4 (N, CA, C, CB), got {n_aa!r}")
    n_atoms = _check_int("n_atoms", n_atoms, minimum=4)
    if bb.dim() != 3 or bb.shape[-1] != 3 or bb.shape[1] == 0 or bb.shape[1] % n_aa:
        raise ValueError(f"backbones must be (B, L * n_aa, 3) with n_aa = {n_aa}, got {tuple(bb.shape)}")
    _check_finite("backbones", bb)
    bb = bb.to(_float_dtype(bb))
    residues = rearrange(bb, "b (l a) d -> b l a d", a=n_aa)  # [b, l, n_aa, 3]
    n_pos, ca_pos, c_pos = residues[:, :, 0], residues[:, :, 1], residues[:, :, 2]
    if place_oxygen:
        psi = get_dihedral_torch(n_pos[:, :-1], ca_pos[:, :-1], c_pos[:, :-1], n_pos[:, 1:])  # [b, l-1]
        psi = torch.cat([psi, psi.new_full((psi.shape[0], 1), 5 * math.pi / 4)], dim=1)  # [b, l]
        oxygen = nerf_torch(n_pos, ca_pos, c_pos, BB_BUILD_INFO["BONDLENS"]["c-o"],
                            math.pi - BB_BUILD_INFO["BONDANGS"]["ca-c-o"], psi - math.pi)
    else:
        oxygen = c_pos
    fill = residues[:, :, 3] if n_aa == 4 else c_pos
    side = repeat(fill, "b l d -> b l s d", s=n_atoms - 4)  # [b, l, n_atoms-4, 3]
    coords = torch.cat([residues[:, :, :3], oxygen.unsqueeze(2), side], dim=2)  # [b, l, n_atoms, 3]
    if cloud_mask is not None:
        mask, _ = _as_tensor("cloud_mask", cloud_mask)
        if tuple(mask.shape) != tuple(coords.shape[:3]):
            raise ValueError(f"cloud_mask must be (B, L, n_atoms) = {tuple(coords.shape[:3])}, "
                             f"got {tuple(mask.shape)}")
        coords = torch.where(mask.bool().to(coords.device).unsqueeze(-1), coords,
                             torch.full_like(coords, float(padding)))
    return coords


# ----------------------------------------------------------------------------------------------------------
# Distogram logits -> coordinates
# ----------------------------------------------------------------------------------------------------------


def distogram_to_coords(logits: torch.Tensor, mask: Optional[torch.Tensor] = None, *, bins=DISTANCE_THRESHOLDS,
                        center: str = "mean", wide: Optional[str] = "std", iters: int = 200, tol: float = 1e-5,
                        fix_mirror: int = 0, N_mask=None, CA_mask=None, C_mask=None,
                        verbose: int = 0) -> torch.Tensor:
    """Distogram logits -> 3D coordinates: softmax -> :func:`center_distogram_torch` -> :func:`MDScaling`.

    Args:
        logits: (B, N, N, K) distogram logits (the model's output; K = ``len(bins)``).
        mask: optional (B, N) bool, True = residue present. Absent residues take no part and get coordinates 0.
        bins, center, wide: as :func:`center_distogram_torch`.
        iters, tol, fix_mirror, N_mask, CA_mask, C_mask, verbose: as :func:`MDScaling` (the backbone masks index
            the N points, padded positions included).

    Returns:
        (B, 3, N) coordinates, each structure centered (over its present residues). Distances cannot tell a
        structure from its mirror image: without ``fix_mirror`` (which needs backbone N/CA/C points) the
        chirality is arbitrary.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 4 or logits.shape[1] != logits.shape[2]:
        raise ValueError(f"logits must be (B, N, N, K), got {tuple(logits.shape)}")
    _check_finite("logits", logits)
    probs = logits.to(_float_dtype(logits)).softmax(dim=-1)
    distances, weights = center_distogram_torch(probs, bins=bins, center=center, wide=wide)
    kwargs = dict(iters=iters, tol=tol, fix_mirror=fix_mirror, verbose=verbose)
    if mask is None:
        coords, _ = MDScaling(distances, weights, N_mask=N_mask, CA_mask=CA_mask, C_mask=C_mask, **kwargs)
        return coords
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"mask must be a (B, N) = {tuple(logits.shape[:2])} bool tensor, "
                         f"got {getattr(mask, 'shape', type(mask))}")
    mask = mask.bool().to(logits.device)
    batch, n = mask.shape
    backbone = [None if m is None else _backbone_masks(name, m, batch, n, logits.device)
                for name, m in (("N_mask", N_mask), ("CA_mask", CA_mask), ("C_mask", C_mask))]
    structures = []
    for i in range(batch):
        keep = mask[i]
        coords = distances.new_zeros(3, n)
        if bool(keep.any()):
            sub = keep.nonzero().flatten()
            sub_masks = [None if m is None else m[i, sub] for m in backbone]
            found, _ = MDScaling(distances[i][sub][:, sub], weights[i][sub][:, sub], N_mask=sub_masks[0],
                                 CA_mask=sub_masks[1], C_mask=sub_masks[2], **kwargs)
            coords = coords.index_copy(1, sub, found[0])
        structures.append(coords)
    return torch.stack(structures)  # [b, 3, n]


# ----------------------------------------------------------------------------------------------------------
# PDB output
# ----------------------------------------------------------------------------------------------------------

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
            K = 14 is the sidechainnet layout (each residue writes its own atoms; other slots are skipped);
            other K need ``atom_names``. In Å; torch or numpy. (Transpose the seed's (3, N) layout first.) Each
            value must print in the PDB format's 8 columns with 3 decimals: within [-999.999, 9999.999] after
            rounding, else a ValueError names the atom.
        sequence: N one-letter codes of the 20 standard amino acids (any case).
        atom_names: K atom names, overriding the defaults above.
        chain_id: one character.
        b_factors: optional (N,) per-residue B-factor column (e.g. pLDDT), in [0, 999.99].

    Returns:
        ``str(path)``.
    """
    xyz, _ = _as_tensor("coords", coords)
    xyz = xyz.detach().cpu().to(torch.float64)
    coords_dim = xyz.dim()
    if xyz.dim() == 2:
        if xyz.shape[0] == 3 and xyz.shape[1] != 3:
            raise ValueError(f"coords must be (N, 3) or (N, K, 3), got {tuple(xyz.shape)}; transpose the seed's "
                             f"(3, N) layout with .T")
        xyz = xyz.unsqueeze(1)  # [n, 1, 3]
    if xyz.dim() != 3 or xyz.shape[-1] != 3 or xyz.shape[0] == 0:
        raise ValueError(f"coords must be (N, 3) or (N, K, 3) with N >= 1, got {tuple(xyz.shape)}")
    _check_finite("coords", xyz)
    n, k, _ = xyz.shape
    if not isinstance(sequence, str):
        raise TypeError(f"sequence must be a str of one-letter codes, got {type(sequence).__name__}")
    sequence = sequence.upper()
    if len(sequence) != n:
        raise ValueError(f"sequence has {len(sequence)} residues but coords has {n}")
    unknown = sorted(set(sequence) - set(ONE_TO_THREE_LETTER_MAP))
    if unknown:
        raise ValueError(f"sequence has unknown residue letters {unknown}; expected one of {AA_ORDER}")
    if atom_names is None:
        if k == NUM_COORDS_PER_RES:
            names_per_residue = [BACKBONE_ATOM_NAMES + SC_ATOM_NAMES[ONE_TO_THREE_LETTER_MAP[aa]] for aa in sequence]
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
        bf, _ = _as_tensor("b_factors", b_factors)
        bf = bf.detach().cpu().to(torch.float64).flatten()
        if bf.numel() != n:
            raise ValueError(f"b_factors must have one value per residue ({n}), got {bf.numel()}")
        _check_finite("b_factors", bf)
        if bool((bf < 0).any()) or bool((bf > 999.99).any()):
            raise ValueError("b_factors must be within [0, 999.99]")

    points = xyz.numpy()
    residues = [ONE_TO_THREE_LETTER_MAP[letter] for letter in sequence]
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


# ----------------------------------------------------------------------------------------------------------
# Superposition-free metrics: lDDT-Cα, distogram accuracy
# ----------------------------------------------------------------------------------------------------------


def lddt_ca(pred, true, mask=None, *, cutoff: float = 15.0, thresholds: Sequence[float] = (0.5, 1.0, 2.0, 4.0)):
    """lDDT of Cα coordinates (Mariani et al. 2013), per structure; no superposition needed.

    Scored pairs: i != j, both present, true distance < ``cutoff``. A pair is preserved at threshold t when
    ``|d_pred - d_true| < t``; the score is the share of preserved pairs averaged over the thresholds (the
    global form, as AlphaFold's ``lddt``).

    Args:
        pred, true: (B, N, 3) or (N, 3) Cα coordinates in Å, torch or numpy (note: not the ``(3, N)`` layout of
            ``RMSD`` / ``GDT`` / ``TMscore``).
        mask: optional (B, N) or (N,) bool, True = residue present in both; absent residues are not scored.
        cutoff: inclusion radius in the true structure, Å.
        thresholds: distance-difference tolerances, Å.

    Returns:
        (B,) in [0, 1], or a 0-d value for (N, 3) input. A structure with no pair to score gets 0 (never NaN).
    """
    p, p_numpy = _as_tensor("pred", pred)
    t, t_numpy = _as_tensor("true", true)
    if p.shape != t.shape:
        raise ValueError(f"pred and true must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    if p.dim() not in (2, 3) or p.shape[-1] != 3:
        raise ValueError(f"pred and true must be (B, N, 3) or (N, 3), got {tuple(p.shape)}")
    if p.device != t.device:
        raise ValueError(f"pred and true must be on the same device, got {p.device} and {t.device}")
    unbatched = p.dim() == 2
    dtype = torch.float64 if torch.float64 in (p.dtype, t.dtype) else torch.float32
    p, t = p.to(dtype), t.to(dtype)
    _check_finite("pred", p)
    _check_finite("true", t)
    if unbatched:
        p, t = p.unsqueeze(0), t.unsqueeze(0)  # [1, n, 3]
    batch, n, _ = p.shape
    if mask is None:
        present = torch.ones(batch, n, dtype=torch.bool, device=p.device)
    else:
        m, _ = _as_tensor("mask", mask)
        expected = (n,) if unbatched else (batch, n)
        if tuple(m.shape) != expected:
            raise ValueError(f"mask must be {expected}, got {tuple(m.shape)}")
        present = m.to(p.device).bool().reshape(batch, n)
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not cutoff > 0:
        raise ValueError(f"cutoff must be a positive distance, got {cutoff!r}")
    tolerances = torch.as_tensor(thresholds, dtype=dtype, device=p.device).flatten()
    if tolerances.numel() == 0 or not bool((tolerances > 0).all()):
        raise ValueError(f"thresholds must be a non-empty sequence of positive distances, got {thresholds!r}")

    d_true = _pairwise_distances(t)  # [b, n, n]
    d_pred = _pairwise_distances(p)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=p.device)
    scored = (d_true < cutoff) & off_diagonal & present[:, :, None] & present[:, None, :]
    preserved = ((d_pred - d_true).abs().unsqueeze(-1) < tolerances).to(dtype).mean(dim=-1)  # [b, n, n]
    total = scored.sum(dim=(-1, -2)).to(dtype)
    score = (preserved * scored).sum(dim=(-1, -2)) / total.clamp_min(1)
    if unbatched:
        score = score[0]
    return _out(score, _wants_numpy("auto", p_numpy and t_numpy), _np_float_dtype(pred))


def distogram_accuracy(logits, labels, ignore_index: int = -100):
    """Share of labelled pairs whose most likely distogram class is the true one.

    Args:
        logits: (..., K) distogram logits (or probabilities), torch or numpy.
        labels: (...) int class labels, e.g. :func:`get_bucketed_distance_matrix`; ``ignore_index`` is skipped.
        ignore_index: label of pairs left out.

    Returns:
        0-d accuracy over all labelled pairs in [0, 1]; NaN when no pair is labelled.
    """
    scores, was_numpy = _as_tensor("logits", logits)
    target, _ = _as_tensor("labels", labels)
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"labels must hold integer classes, got {target.dtype}")
    if scores.dim() < 1 or tuple(scores.shape[:-1]) != tuple(target.shape):
        raise ValueError(f"logits must be labels' shape {tuple(target.shape)} plus a class dimension, "
                         f"got {tuple(scores.shape)}")
    _check_finite("logits", scores)
    target = target.to(scores.device).long()
    valid = target != ignore_index
    if bool((target[valid] < 0).any()) or bool((target[valid] >= scores.shape[-1]).any()):
        raise ValueError(f"labels must be in [0, {scores.shape[-1]}) or ignore_index={ignore_index}")
    correct = (scores.argmax(dim=-1) == target) & valid
    count = valid.sum()
    accuracy = torch.where(count > 0, correct.sum().double() / count.clamp_min(1),
                           torch.tensor(float("nan"), dtype=torch.float64, device=scores.device))
    return _out(accuracy, was_numpy)


# ----------------------------------------------------------------------------------------------------------
# The seed's backend-specific names and decorators (thin faces over the functions above)
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
        backend = _check_backend(backend)
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
    """Metric MDS of (B, N, N) distances, torch out: :func:`MDScaling` without mirror fixing.

    Returns:
        coords (B, 3, N) and the stress history (B, steps).
    """
    return MDScaling(pre_dist_mat, weights, iters=iters, tol=tol, verbose=verbose, backend="torch")


def mds_numpy(pre_dist_mat, weights=None, iters: int = 10, tol: float = 1e-5, verbose: int = 2):
    """:func:`mds_torch` with numpy outputs."""
    return MDScaling(pre_dist_mat, weights, iters=iters, tol=tol, verbose=verbose, backend="numpy")


def _mdscaling(pre_dist_mat, weights, iters, tol, fix_mirror, N_mask, CA_mask, C_mask, verbose, backend):
    coords, stresses = MDScaling(pre_dist_mat, weights, iters=iters, tol=tol, fix_mirror=fix_mirror,
                                 N_mask=N_mask, CA_mask=CA_mask, C_mask=C_mask, verbose=verbose, backend=backend)
    if not fix_mirror and coords.shape[0] == 1:
        return coords[0], stresses[0]  # the seed's (3, N) and (steps,)
    return coords, stresses


def mdscaling_torch(pre_dist_mat, weights=None, iters: int = 10, tol: float = 1e-5, fix_mirror: int = 0,
                    N_mask=None, CA_mask=None, C_mask=None, verbose: int = 2):
    """The seed's MDS entry point, torch out (see :func:`MDScaling` for the arguments).

    Returns:
        fix_mirror = 0: coords (3, N) and stresses (steps,) for one structure ((B, 3, N), (B, steps) for B > 1).
        fix_mirror > 0: coords (B, 3, N) of the chirality with mostly negative phi, and stresses (B, steps).

    Seed difference: the embedding is deterministic, so instead of ``fix_mirror`` random restarts it runs once
    and mirrors the result when most phi angles come out positive (the same choice among the two mirrors).
    """
    return _mdscaling(pre_dist_mat, weights, iters, tol, fix_mirror, N_mask, CA_mask, C_mask, verbose, "torch")


def mdscaling_numpy(pre_dist_mat, weights=None, iters: int = 10, tol: float = 1e-5, fix_mirror: int = 0,
                    N_mask=None, CA_mask=None, C_mask=None, verbose: int = 2):
    """:func:`mdscaling_torch` with numpy outputs."""
    return _mdscaling(pre_dist_mat, weights, iters, tol, fix_mirror, N_mask, CA_mask, C_mask, verbose, "numpy")


def _fix_mirrors(preds, stresses, N_mask, CA_mask, C_mask, verbose, to_numpy):
    p, _ = _as_tensor("preds", preds)
    if p.dim() != 3 or p.shape[1] != 3 or p.shape[0] == 0:
        raise ValueError(f"preds must be (n_mirrors, 3, N), got {tuple(p.shape)}")
    shares = calc_phis_torch(p, N_mask, CA_mask, C_mask, prop=True)  # [m]
    best = int(torch.nan_to_num(shares, nan=-1.0).argmax())
    if verbose:
        print(f"fix_mirrors: structure {best} has the most negative phi (share {float(shares[best]):.3f})")
    return _out(p[best:best + 1], to_numpy), stresses[best]


def fix_mirrors_torch(preds, stresses, N_mask, CA_mask, C_mask=None, verbose: int = 0):
    """Of ``preds`` (n_mirrors, 3, N), the structure with the largest share of negative phi angles (real proteins'
    chirality), as (1, 3, N), and ``stresses[i]`` of that structure."""
    return _fix_mirrors(preds, stresses, N_mask, CA_mask, C_mask, verbose, to_numpy=False)


def fix_mirrors_numpy(preds, stresses, N_mask, CA_mask, C_mask=None, verbose: int = 0):
    """:func:`fix_mirrors_torch` with a numpy structure out."""
    return _fix_mirrors(preds, stresses, N_mask, CA_mask, C_mask, verbose, to_numpy=True)


def get_dihedral_numpy(c1, c2, c3, c4):
    """:func:`get_dihedral_torch` with a numpy result."""
    return _out(torch.as_tensor(get_dihedral_torch(c1, c2, c3, c4)), True)


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
    xyz, _ = _as_tensor("coords", coords)
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
