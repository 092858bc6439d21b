"""Coordinate geometry: pairwise distances, dihedrals and NeRF, backbone phi angles, Kabsch superposition and the
seed's scores of coordinates as given (RMSD, GDT, TMscore), and the seed's 14-slot atom layout (masks and
``sidechain_container``).

Conventions are the seed's (alphafold2-pytorch 0.0.19): coordinates for alignment and scores are ``(3, N)`` or
``(B, 3, N)``; atoms are laid out in ``residue_constants.SEED_ATOMS_PER_RESIDUE = 14`` slots per residue
(sidechainnet 0.x's layout: N, CA, C, O, then the side chain). Functions that take arrays accept torch tensors or
numpy arrays and return the kind they were given (:mod:`af2_ext._backend`). Where a function knowingly differs
from the seed, its docstring says so in a line starting "Seed difference".

The scores under the superposition that maximises them (the standard TM-score and GDT-TS), lDDT-Cα and the
distogram accuracy are in :mod:`af2_ext.structure_scores`.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from einops import rearrange, repeat

from af2_ext import residue_constants as rc
from af2_ext._backend import (as_tensor, check_backend, check_finite, compute_dtype, numpy_float_dtype, to_output,
                              wants_numpy)
from af2_ext._checks import check_int

__all__ = [
    "pairwise_distances",
    "get_dihedral_torch",
    "nerf_torch",
    "backbone_mask_rows",
    "calc_phis_torch",
    "Kabsch",
    "RMSD",
    "GDT",
    "TMscore",
    "scn_backbone_mask",
    "scn_cloud_mask",
    "sidechain_container",
]

_GDT_CUTOFFS = {"TS": (1.0, 2.0, 4.0, 8.0), "HA": (0.5, 1.0, 2.0, 4.0)}


# ----------------------------------------------------------------------------------------------------------
# Distances, dihedrals, NeRF, backbone phi
# ----------------------------------------------------------------------------------------------------------


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of ``x`` (B, N, 3) -> (B, N, N), exact (no ``|a|^2 + |b|^2 - 2ab`` cancellation) and
    with a zero (not NaN) gradient at coincident points."""
    diff = x[:, :, None, :] - x[:, None, :, :]  # [b, n, n, 3]
    sq = (diff * diff).sum(dim=-1)
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def get_dihedral_torch(c1, c2, c3, c4):
    """Dihedral angle c1-c2-c3-c4 in radians, in (-pi, pi], IUPAC sign (positive = clockwise looking along
    c2 -> c3); the atan2 form of https://en.wikipedia.org/wiki/Dihedral_angle#In_polymer_physics.

    Args:
        c1, c2, c3, c4: (..., 3) points, broadcastable; torch (or numpy, then numpy out).

    Returns:
        (...) angles; 0 for degenerate (collinear) geometry.
    """
    points = [as_tensor(name, c) for name, c in (("c1", c1), ("c2", c2), ("c3", c3), ("c4", c4))]
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
    return to_output(torch.atan2(y, x), was_numpy)


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
    a, _ = as_tensor("a", a)
    b, _ = as_tensor("b", b)
    c, _ = as_tensor("c", c)
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype, c.dtype) else torch.float32
    a, b, c = a.to(dtype), b.to(dtype), c.to(dtype)
    for name, p in (("a", a), ("b", b), ("c", c)):
        if p.dim() == 0 or p.shape[-1] != 3:
            raise ValueError(f"{name} must be (..., 3), got {tuple(p.shape)}")
    l, theta, chi = (torch.as_tensor(v, dtype=dtype, device=c.device) for v in (l, theta, chi))
    if not bool(((theta >= -math.pi) & (theta <= math.pi)).all()):
        raise ValueError(f"theta must be in radians within [-pi, pi], got {theta}")
    for name, v in (("l", l), ("theta", theta), ("chi", chi)):
        check_finite(name, v)
    l, theta, chi = torch.broadcast_tensors(l, theta, chi)
    a, b, c = torch.broadcast_tensors(a, b, c)
    bc = torch.nn.functional.normalize(c - b, dim=-1)
    normal = torch.nn.functional.normalize(torch.linalg.cross(b - a, bc, dim=-1), dim=-1)
    frame = torch.stack([bc, torch.linalg.cross(normal, bc, dim=-1), normal], dim=-1)  # [..., 3, 3] columns
    local = torch.stack([l * torch.cos(theta),
                         l * torch.sin(theta) * torch.cos(chi),
                         l * torch.sin(theta) * torch.sin(chi)], dim=-1)  # [..., 3]
    return c + (frame @ local.unsqueeze(-1)).squeeze(-1)


def backbone_mask_rows(name: str, mask, batch: int, n: int, device) -> torch.Tensor:
    """A backbone mask argument (``N_mask``, ``CA_mask``, ``C_mask``: bool (N,), (1, N) or (B, N), or a 1-D
    integer index array) as a (B, N) bool tensor on ``device``; errors name the argument ``name``."""
    t, _ = as_tensor(name, mask)
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
    coords, was_numpy = as_tensor("pred_coords", pred_coords)
    if coords.dim() == 2:
        coords = coords.unsqueeze(0)  # [1, 3, n]
    if coords.dim() != 3 or coords.shape[1] != 3:
        raise ValueError(f"pred_coords must be (B, 3, N), got {tuple(coords.shape)}")
    batch, _, n = coords.shape
    n_mask = backbone_mask_rows("N_mask", N_mask, batch, n, coords.device)
    ca_mask = backbone_mask_rows("CA_mask", CA_mask, batch, n, coords.device)
    c_mask = ~(n_mask | ca_mask) if C_mask is None else backbone_mask_rows("C_mask", C_mask, batch, n, coords.device)
    points = rearrange(coords.detach(), "b d n -> b n d")  # [b, n, 3]
    phis = []
    for i in range(batch):
        n_atoms, ca_atoms, c_atoms = points[i][n_mask[i]], points[i][ca_mask[i]], points[i][c_mask[i]]
        if not len(n_atoms) == len(ca_atoms) == len(c_atoms):
            raise ValueError(f"N_mask, CA_mask and C_mask must select as many atoms each, got {len(n_atoms)}, "
                             f"{len(ca_atoms)}, {len(c_atoms)} in structure {i}")
        phis.append(get_dihedral_torch(c_atoms[:-1], n_atoms[1:], ca_atoms[1:], c_atoms[1:]))
    if not prop:
        return [to_output(p, was_numpy) for p in phis]
    share = torch.stack([(p < 0).to(coords.dtype if coords.is_floating_point() else torch.float32).mean()
                         if p.numel() else torch.tensor(float("nan"), device=coords.device) for p in phis])
    return to_output(share, was_numpy)


# ----------------------------------------------------------------------------------------------------------
# Alignment and the seed's scores of coordinates as given ((3, N) or (B, 3, N))
# ----------------------------------------------------------------------------------------------------------


def _pair(A, B, *, batched: bool) -> tuple[torch.Tensor, torch.Tensor, bool, Optional[np.dtype]]:
    a, a_numpy = as_tensor("A", A)
    b, b_numpy = as_tensor("B", B)
    if a.shape != b.shape:
        raise ValueError(f"A and B must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 2 or a.shape[-2] != 3 or a.shape[-1] == 0 or (batched and a.dim() > 3):
        expected = "(3, N) or (B, 3, N)" if batched else "(..., 3, N)"
        raise ValueError(f"A and B must be {expected} with N >= 1, got {tuple(a.shape)}")
    if a.device != b.device:
        raise ValueError(f"A and B must be on the same device, got {a.device} and {b.device}")
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    check_finite("A", a)
    check_finite("B", b)
    if batched and a.dim() == 2:
        a, b = a.unsqueeze(0), b.unsqueeze(0)  # [1, 3, n]
    return a, b, a_numpy and b_numpy, numpy_float_dtype(A)


def Kabsch(A, B, *, backend: str = "auto"):
    """Optimal rotation of A onto B (Kabsch 1976; proper rotations only, never a reflection).

    Args:
        A, B: (3, N) or (..., 3, N) coordinates, the same shape.

    Returns:
        (A_aligned, B_centered), both (..., 3, N): A centered and rotated, B centered, as the seed returns.
        The rotation is computed without gradient (as the seed); gradients flow through the coordinates.
    """
    backend = check_backend(backend)
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
    to_numpy = wants_numpy(backend, was_numpy)
    return to_output(aligned, to_numpy, np_dtype), to_output(b_centered, to_numpy, np_dtype)


def RMSD(A, B, *, backend: str = "auto"):
    """Root-mean-square deviation ``sqrt(mean_i |a_i - b_i|^2)`` of already aligned coordinates.

    Args:
        A, B: (3, N) or (B, 3, N).

    Returns:
        (B,) (``(1,)`` for unbatched input, as the seed).

    Seed difference: the seed averaged over the 3 coordinates as well, reporting ``RMSD / sqrt(3)``.
    """
    backend = check_backend(backend)
    a, b, was_numpy, np_dtype = _pair(A, B, batched=True)
    rmsd = (a - b).square().sum(dim=-2).mean(dim=-1).sqrt()
    return to_output(rmsd, wants_numpy(backend, was_numpy), np_dtype)


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
    backend = check_backend(backend)
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
    return to_output((within * w).sum(dim=-1) / w.sum(), wants_numpy(backend, was_numpy), np_dtype)


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
    backend = check_backend(backend)
    a, b, was_numpy, np_dtype = _pair(A, B, batched=True)
    length = a.shape[-1]
    d0 = max(0.5, 1.24 * (length - 15) ** (1.0 / 3.0) - 1.8) if length > 21 else 0.5
    dist_sq = (a - b).square().sum(dim=-2)  # [b, n]
    score = (1.0 / (1.0 + dist_sq / d0 ** 2)).mean(dim=-1)
    return to_output(score, wants_numpy(backend, was_numpy), np_dtype)


# ----------------------------------------------------------------------------------------------------------
# The seed's 14-slot atom layout (sidechainnet 0.x)
# ----------------------------------------------------------------------------------------------------------


def _cloud_table() -> torch.Tensor:
    """(22, 14) bool: atom slots present for each sidechainnet token (0..19 the amino acids, 20 pad: none,
    21 unknown: backbone only)."""
    table = torch.zeros(rc.SCN_UNKNOWN_TOKEN + 1, rc.SEED_ATOMS_PER_RESIDUE, dtype=torch.bool)
    for token, letter in enumerate(rc.RESTYPES):
        table[token, : len(rc.BACKBONE_ATOM_NAMES) + len(rc.SIDECHAIN_ATOM_NAMES[rc.ONE_TO_THREE[letter]])] = True
    table[rc.SCN_UNKNOWN_TOKEN, : len(rc.BACKBONE_ATOM_NAMES)] = True
    return table


_CLOUD_TABLE = _cloud_table()


def _int_tokens(name: str, value) -> torch.Tensor:
    t, _ = as_tensor(name, value)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer tokens, got {t.dtype}")
    return t.long()


def scn_backbone_mask(scn_seq, boolean: bool = True, l_aa: int = rc.SEED_ATOMS_PER_RESIDUE, *,
                      c_mask: bool = False):
    """Masks of the backbone N and CA points in a flattened ``l_aa``-atoms-per-residue cloud (the seed's call).

    Atoms are ordered [N, CA, C, ...] in each residue: N is slot 0, CA slot 1, C slot 2 (``l_aa = 14`` for the
    seed's layout, the default; 3 for N/CA/C backbones, 4 with CB).

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
    l_aa = check_int("l_aa", l_aa, minimum=3 if c_mask else 2)
    if len(shape) not in (1, 2):
        raise ValueError(f"scn_seq must be (L,) or (B, L), got {shape}")
    slot = torch.arange(l_aa, device=device).expand(*shape, l_aa)  # [..., l, l_aa]
    slot = rearrange(slot, "... l c -> ... (l c)")  # [..., l*l_aa]
    masks = (slot == 0, slot == 1, slot == 2) if c_mask else (slot == 0, slot == 1)
    if boolean:
        return masks
    return tuple(torch.nonzero(m) for m in masks)


def scn_cloud_mask(scn_seq, boolean: bool = True, *, coords=None):
    """Which of the seed's 14 atom slots (sidechainnet 0.x's layout) each residue has.

    Args:
        scn_seq: (L,) or (B, L) sidechainnet tokens (0..19 = ``RESTYPES``, 20 pad, 21 unknown: backbone only).
        boolean: return the bool mask (else its ``torch.nonzero`` indices).
        coords: keyword-only, not in the seed: optional (B, L*14, 3) or (B, L, 14, 3) coordinates in
            the 14-slot layout: then the mask is "slot has a
            nonzero coordinate" (the atoms actually present) and ``scn_seq`` is not read.

    Returns:
        (B, L, 14) bool (or the nonzero indices).
    """
    if coords is not None:
        c, _ = as_tensor("coords", coords)
        if c.dim() == 2:
            c = c.unsqueeze(0)  # [1, l*14, 3]
        if c.dim() == 3:
            if c.shape[-1] != 3 or c.shape[1] % rc.SEED_ATOMS_PER_RESIDUE:
                raise ValueError(f"coords must be (B, L*14, 3) or (B, L, 14, 3), got {tuple(c.shape)}")
            c = rearrange(c, "b (l c) d -> b l c d", c=rc.SEED_ATOMS_PER_RESIDUE)  # [b, l, 14, 3]
        if c.dim() != 4 or c.shape[-2:] != (rc.SEED_ATOMS_PER_RESIDUE, 3):
            raise ValueError(f"coords must be (B, L*14, 3) or (B, L, 14, 3), got {tuple(c.shape)}")
        mask = (c != 0).any(dim=-1)
    else:
        seq = _int_tokens("scn_seq", scn_seq)
        if seq.dim() == 1:
            seq = seq.unsqueeze(0)  # [1, l]
        if seq.dim() != 2:
            raise ValueError(f"scn_seq must be (L,) or (B, L), got {tuple(seq.shape)}")
        if seq.numel() and (int(seq.min()) < 0 or int(seq.max()) > rc.SCN_UNKNOWN_TOKEN):
            raise ValueError(f"scn_seq tokens must be in [0, {rc.SCN_UNKNOWN_TOKEN}], "
                             f"got [{int(seq.min())}, {int(seq.max())}]")
        mask = _CLOUD_TABLE.to(seq.device)[seq]  # [b, l, 14]
    return mask if boolean else torch.nonzero(mask)


def sidechain_container(backbones, place_oxygen: bool = False, n_atoms: int = rc.SEED_ATOMS_PER_RESIDUE,
                        padding: float = rc.COORD_PAD_VALUE, *, n_aa: int = 3, cloud_mask=None) -> torch.Tensor:
    """Backbone -> coordinates in the seed's 14-slot layout (differentiable), the seed's call.

    Slots 0-2 get N, CA, C; slot 3 (O) gets the carbonyl oxygen placed by NeRF from psi when ``place_oxygen``
    (bond 1.229 Å, bond angle CA-C-O 2.0944, dihedral N-CA-C-O = psi - pi; psi of the last residue taken as
    5pi/4, as the seed), else C; slots 4.. get C as the seed (``n_aa = 3``), or the 4th point (CB, ``n_aa = 4``).

    Args:
        backbones: (B, L * n_aa, 3) points per residue (N, CA, C[, CB]).
        place_oxygen: compute O (else O = C).
        n_atoms: atom slots per residue (>= 4; the seed's layout: 14).
        padding: value of slots outside ``cloud_mask``.
        n_aa: keyword-only, not in the seed: 3 (N, CA, C) or 4 (N, CA, C, CB) points per residue.
        cloud_mask: keyword-only, not in the seed: optional (B, L, n_atoms) bool; slots outside it are set to
            ``padding``.

    Returns:
        (B, L, n_atoms, 3).

    Seed difference (a fix): the seed passed the CA-C-O bond angle as NeRF's theta, which is its supplement, so
    its O sat at 60 degrees from CA; here CA-C-O is 2.0944 rad (120 degrees) and each structure uses its own psi.
    """
    bb, _ = as_tensor("backbones", backbones)
    if n_aa not in (3, 4) or isinstance(n_aa, bool):
        raise ValueError(f"n_aa must be 3 (N, CA, C) or 4 (N, CA, C, CB), got {n_aa!r}")
    n_atoms = check_int("n_atoms", n_atoms, minimum=4)
    if bb.dim() != 3 or bb.shape[-1] != 3 or bb.shape[1] == 0 or bb.shape[1] % n_aa:
        raise ValueError(f"backbones must be (B, L * n_aa, 3) with n_aa = {n_aa}, got {tuple(bb.shape)}")
    check_finite("backbones", bb)
    bb = bb.to(compute_dtype(bb))
    residues = rearrange(bb, "b (l a) d -> b l a d", a=n_aa)  # [b, l, n_aa, 3]
    n_pos, ca_pos, c_pos = residues[:, :, 0], residues[:, :, 1], residues[:, :, 2]
    if place_oxygen:
        psi = get_dihedral_torch(n_pos[:, :-1], ca_pos[:, :-1], c_pos[:, :-1], n_pos[:, 1:])  # [b, l-1]
        psi = torch.cat([psi, psi.new_full((psi.shape[0], 1), 5 * math.pi / 4)], dim=1)  # [b, l]
        oxygen = nerf_torch(n_pos, ca_pos, c_pos, rc.BACKBONE_BUILD_INFO["BONDLENS"]["c-o"],
                            math.pi - rc.BACKBONE_BUILD_INFO["BONDANGS"]["ca-c-o"], psi - math.pi)
    else:
        oxygen = c_pos
    fill = residues[:, :, 3] if n_aa == 4 else c_pos
    side = repeat(fill, "b l d -> b l s d", s=n_atoms - 4)  # [b, l, n_atoms-4, 3]
    coords = torch.cat([residues[:, :, :3], oxygen.unsqueeze(2), side], dim=2)  # [b, l, n_atoms, 3]
    if cloud_mask is not None:
        mask, _ = as_tensor("cloud_mask", cloud_mask)
        if tuple(mask.shape) != tuple(coords.shape[:3]):
            raise ValueError(f"cloud_mask must be (B, L, n_atoms) = {tuple(coords.shape[:3])}, "
                             f"got {tuple(mask.shape)}")
        coords = torch.where(mask.bool().to(coords.device).unsqueeze(-1), coords,
                             torch.full_like(coords, float(padding)))
    return coords
