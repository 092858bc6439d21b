"""Distogram -> distances -> 3D coordinates: distogram labels and centring, classical MDS, weighted SMACOF
(``MDScaling``), the mirror choice from backbone phi, and ``distogram_to_coords`` (logits to coordinates).

The distogram has ``DISTOGRAM_BUCKETS = 37`` classes over ``DISTANCE_THRESHOLDS = linspace(2, 20, 37)`` Å
(:mod:`af2_ext.residue_constants`): class 0 is ``d <= 2``, class ``k`` (1..35) is ``2 + 0.5 (k - 1) < d <= 2 +
0.5 k``, class 36 is ``d > 19.5`` (:func:`get_bucketed_distance_matrix` is the labelling,
:func:`center_distogram_torch` its inverse).

Names and conventions are the seed's (alphafold2-pytorch 0.0.19); each function's docstring says where it
knowingly differs, in a line starting "Seed difference".
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from einops import rearrange

from af2_ext._backend import (as_tensor, check_backend, check_finite, compute_dtype, numpy_float_dtype, to_output,
                              wants_numpy)
from af2_ext._checks import check_int
from af2_ext.geometry import backbone_mask_rows, calc_phis_torch, pairwise_distances
from af2_ext.residue_constants import DISTANCE_THRESHOLDS, DISTOGRAM_BUCKETS

__all__ = [
    "get_bucketed_distance_matrix",
    "center_distogram_torch",
    "MDScaling",
    "select_mirror",
    "distogram_to_coords",
]

_WARNED: set = set()  # one-time warnings already given (python_tests reset it)


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
    check_finite("coords", coords)
    num_buckets = check_int("num_buckets", num_buckets, minimum=2)
    coords = coords.to(compute_dtype(coords))
    distances = pairwise_distances(coords)
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
    check_finite("distogram", distogram)
    if bool((distogram < 0).any()):
        # Negative entries cannot be probabilities: these are logits, as the seed README passes the model's
        # output straight in. Softmax them (the seed used them as they were, which gave garbage distances).
        if "center_distogram_logits" not in _WARNED:
            _WARNED.add("center_distogram_logits")
            warnings.warn("center_distogram_torch: the distogram has negative entries, so it is taken as logits "
                          "and softmaxed; pass probabilities or use distogram_to_coords to silence this",
                          RuntimeWarning, stacklevel=2)
        distogram = distogram.float().softmax(dim=-1)
    dtype = compute_dtype(distogram)
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
        dist = pairwise_distances(coords)
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
              N_mask=None, CA_mask=None, C_mask=None, verbose: int = 0, *, backend: str = "auto",
              batched: bool = False):
    """3D coordinates whose distances best match ``pre_dist_mat`` (weighted metric MDS by SMACOF).

    Args:
        pre_dist_mat: (B, N, N) or (N, N) target distances in Å, torch or numpy; non-negative, finite. The
            seed's call passes one structure, (1, N, N).
        weights: optional (B, N, N) or (N, N) non-negative confidence per pair (``center_distogram_torch``'s);
            0 ignores a pair. Default all 1.
        iters: maximum number of SMACOF updates (0 returns the classical-MDS start).
        tol: stop when every structure's relative stress decrease in one update is <= tol.
        fix_mirror: > 0 picks the chirality: MDS cannot tell a structure from its mirror image, so if most
            backbone phi angles (from ``N_mask`` / ``CA_mask`` / ``C_mask``) come out positive, the z axis is
            flipped (real proteins have mostly negative phi).
        N_mask, CA_mask: bool (N,) or (B, N) masks of the backbone N / CA points; required when fix_mirror > 0.
        C_mask: same for C; default: the points that are neither N nor CA (``scn_backbone_mask(l_aa=3)`` order).
        verbose: 1 reports convergence, 2 every iteration.
        backend: "auto" (same kind as ``pre_dist_mat``), "torch" or "numpy" for the outputs.
        batched: keyword-only, not in the seed: always return (B, 3, N) coordinates and (B, steps) stresses.

    Returns:
        (coords, stresses): coords centered at the origin, in the seed's (3, N) layout; stresses the stress
        ``1/2 sum_ij w_ij (|x_i - x_j| - d_ij)^2`` before the first and after each update, the last being the
        returned coords'. Shapes, as the seed's for one structure:

        - one structure, ``fix_mirror=0``: coords (3, N), stresses (steps,);
        - one structure, ``fix_mirror > 0``: coords (1, 3, N), stresses (steps,);
        - B > 1 structures (the seed's call raised) or ``batched=True``: coords (B, 3, N), stresses (B, steps).

    Seed differences: the weighted Guttman transform ``V^+ B(X) X`` (the seed's ``B(X) X / N`` is only right for
    unit weights and shrinks the structure under distogram weights); a deterministic classical-MDS start instead
    of a random one, so ``fix_mirror = k`` mirrors the one embedding when needed instead of drawing k; stresses
    are the stress itself (the seed's history was the stress over ``|X|``); degenerate input (all-zero distances
    or weights, a single point) gives finite output; ``verbose`` defaults to 0 (the seed printed every
    iteration).

    Any finite distances work: each structure is fitted with its distances scaled by a power of two into
    [0.5, 1) (exact; the fit is scale-equivariant) and scaled back, so squares neither overflow nor underflow.
    Only when the coordinates or stresses in the input's units are beyond its dtype (stresses are squared
    distances: float32 distances of 1e17 Å and more that no structure fits exactly, say) does a ValueError name
    ``pre_dist_mat`` and ask for float64.
    """
    backend = check_backend(backend)
    dist, was_numpy = as_tensor("pre_dist_mat", pre_dist_mat)
    np_dtype = numpy_float_dtype(pre_dist_mat)
    if dist.dim() == 2:
        dist = dist.unsqueeze(0)  # [1, n, n]
    if dist.dim() != 3 or dist.shape[1] != dist.shape[2] or dist.shape[1] == 0:
        raise ValueError(f"pre_dist_mat must be (B, N, N) or (N, N) with N >= 1, got {tuple(dist.shape)}")
    check_finite("pre_dist_mat", dist)
    if bool((dist < 0).any()):
        raise ValueError("pre_dist_mat must be non-negative distances")
    dist = dist.to(compute_dtype(dist))
    if weights is None:
        w = torch.ones_like(dist)
    else:
        w, _ = as_tensor("weights", weights)
        w = w.to(dtype=dist.dtype, device=dist.device)
        if w.dim() == 2:
            w = w.unsqueeze(0)  # [1, n, n]
        if w.dim() != 3 or w.shape[1:] != dist.shape[1:] or w.shape[0] not in (1, dist.shape[0]):
            raise ValueError(f"weights must have pre_dist_mat's shape {tuple(dist.shape)}, got {tuple(w.shape)}")
        check_finite("weights", w)
        if bool((w < 0).any()):
            raise ValueError("weights must be non-negative")
        w = w.expand_as(dist)
    iters = check_int("iters", iters, minimum=0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a float >= 0, got {tol!r}")
    fix_mirror = check_int("fix_mirror", int(fix_mirror) if isinstance(fix_mirror, bool) else fix_mirror,
                            minimum=0)
    verbose = check_int("verbose", int(verbose) if isinstance(verbose, bool) else verbose, minimum=0)
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be a bool, got {batched!r}")
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
    if not batched and coords.shape[0] == 1:
        stresses = stresses[0]  # [steps]: one structure's history
        if not fix_mirror:
            coords = coords[0]  # [3, n]: the seed's shape without mirror fixing
    to_numpy = wants_numpy(backend, was_numpy)
    return to_output(coords, to_numpy, np_dtype), to_output(stresses, to_numpy, np_dtype)


def select_mirror(preds, N_mask, CA_mask, C_mask=None) -> int:
    """Index of the structure in ``preds`` (M, 3, N) with the largest share of negative backbone phi angles
    (real proteins' chirality; the seed's ``fix_mirrors_*`` choice). Masks as :func:`MDScaling`'s."""
    p, _ = as_tensor("preds", preds)
    if p.dim() != 3 or p.shape[1] != 3 or p.shape[0] == 0:
        raise ValueError(f"preds must be (n_mirrors, 3, N), got {tuple(p.shape)}")
    shares = calc_phis_torch(p, N_mask, CA_mask, C_mask, prop=True)  # [m]
    return int(torch.nan_to_num(shares, nan=-1.0).argmax())


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
    check_finite("logits", logits)
    probs = logits.to(compute_dtype(logits)).softmax(dim=-1)
    distances, weights = center_distogram_torch(probs, bins=bins, center=center, wide=wide)
    kwargs = dict(iters=iters, tol=tol, fix_mirror=fix_mirror, verbose=verbose)
    if mask is None:
        coords, _ = MDScaling(distances, weights, N_mask=N_mask, CA_mask=CA_mask, C_mask=C_mask, batched=True,
                              **kwargs)
        return coords
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"mask must be a (B, N) = {tuple(logits.shape[:2])} bool tensor, "
                         f"got {getattr(mask, 'shape', type(mask))}")
    mask = mask.bool().to(logits.device)
    batch, n = mask.shape
    backbone = [None if m is None else backbone_mask_rows(name, m, batch, n, logits.device)
                for name, m in (("N_mask", N_mask), ("CA_mask", CA_mask), ("C_mask", C_mask))]
    structures = []
    for i in range(batch):
        keep = mask[i]
        coords = distances.new_zeros(3, n)
        if bool(keep.any()):
            sub = keep.nonzero().flatten()
            sub_masks = [None if m is None else m[i, sub] for m in backbone]
            found, _ = MDScaling(distances[i][sub][:, sub], weights[i][sub][:, sub], N_mask=sub_masks[0],
                                 CA_mask=sub_masks[1], C_mask=sub_masks[2], batched=True, **kwargs)
            coords = coords.index_copy(1, sub, found[0])
        structures.append(coords)
    return torch.stack(structures)  # [b, 3, n]
