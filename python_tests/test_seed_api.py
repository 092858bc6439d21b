"""The seed's public API (alphafold2-pytorch 0.0.19, ../shared/seed/alphafold2-pytorch-0.0.19-api.md) called
the way the seed's users call it: every name importable with the seed's parameters and defaults, the seed's
shapes and conventions, and one test per deliberate difference (``test_difference_*``)."""
import inspect
import math
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import af2_ext
from af2_ext import model, utils

_ = inspect.Parameter.empty
P_OR_K, KW_ONLY, VAR_KW = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY,
                           inspect.Parameter.VAR_KEYWORD)
_MDS = [("pre_dist_mat", _), ("weights", None), ("iters", 10), ("tol", 1e-5), ("verbose", 2)]
_MDSCALING = [("pre_dist_mat", _), ("weights", None), ("iters", 10), ("tol", 1e-5), ("fix_mirror", 0),
              ("N_mask", None), ("CA_mask", None), ("C_mask", None), ("verbose", 2)]
_FIX_MIRRORS = [("preds", _), ("stresses", _), ("N_mask", _), ("CA_mask", _), ("C_mask", None), ("verbose", 0)]
_XY = [("X", _), ("Y", _)]
_DIHEDRAL = [("c1", _), ("c2", _), ("c3", _), ("c4", _)]

# name -> the seed's positional-or-keyword parameters (name, default), then its keyword-only ones.
SEED_UTILS = {
    "scn_cloud_mask": ([("scn_seq", _), ("boolean", True)], []),
    "scn_backbone_mask": ([("scn_seq", _), ("boolean", True), ("l_aa", 14)], []),
    "nerf_torch": ([("a", _), ("b", _), ("c", _), ("l", _), ("theta", _), ("chi", _)], []),
    "sidechain_container": ([("backbones", _), ("place_oxygen", False), ("n_atoms", 14), ("padding", 0)], []),
    "center_distogram_torch": ([("distogram", _), ("bins", utils.DISTANCE_THRESHOLDS), ("min_t", 1.0),
                                ("center", "mean"), ("wide", "std")], []),
    "mds_torch": (_MDS, []), "mds_numpy": (_MDS, []),
    "mdscaling_torch": (_MDSCALING, []), "mdscaling_numpy": (_MDSCALING, []),
    "fix_mirrors_torch": (_FIX_MIRRORS, []), "fix_mirrors_numpy": (_FIX_MIRRORS, []),
    "get_dihedral_torch": (_DIHEDRAL, []), "get_dihedral_numpy": (_DIHEDRAL, []),
    "kabsch_torch": (_XY, []), "kabsch_numpy": (_XY, []),
    "rmsd_torch": (_XY, []), "rmsd_numpy": (_XY, []),
    "gdt_torch": (_XY + [("cutoffs", _), ("weights", None)], []),
    "gdt_numpy": (_XY + [("cutoffs", _), ("weights", None)], []),
    "tmscore_torch": (_XY, []), "tmscore_numpy": (_XY, []),
    "Kabsch": ([("A", _), ("B", _)], [("backend", "auto")]),
    "RMSD": ([("A", _), ("B", _)], [("backend", "auto")]),
    "TMscore": ([("A", _), ("B", _)], [("backend", "auto")]),
    "GDT": ([("A", _), ("B", _)], [("mode", "TS"), ("cutoffs", [1, 2, 4, 8]), ("weights", None),
                                     ("backend", "auto")]),
    "expand_dims_to": ([("t", _), ("length", 3)], []),
    "set_backend_kwarg": ([("fn", _)], []),
    "expand_arg_dims": ([("dim_len", 3)], []),
    "invoke_torch_or_numpy": ([("torch_fn", _), ("numpy_fn", _)], []),
    "download_pdb": ([("name", _), ("route", _)], []),
    "clean_pdb": ([("name", _), ("route", None), ("chain_num", None)], []),
    "custom2pdb": ([("coords", _), ("proteinnet_id", _), ("route", _)], []),
}

SEED_ALPHAFOLD2_INIT = [("dim", _), ("max_seq_len", 2048), ("depth", 6), ("heads", 8), ("dim_head", 64),
                        ("pos_token", 3), ("num_tokens", 21), ("num_embedds", 1280), ("attn_dropout", 0.0),
                        ("ff_dropout", 0.0), ("reversible", False), ("sparse_self_attn", False),
                        ("cross_attn_compress_ratio", 1), ("inter_msa_self_attn", True)]


def _same_default(got, want) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and torch.equal(got, want)
    return type(got) is type(want) and got == want if want is not _ else got is _


def _check_signature(fn, positional, keyword_only, *, skip_self=False):
    """``fn`` takes the seed's parameters in the seed's order, kinds and defaults; anything more must be
    keyword-only with a default (an addition, never a rename)."""
    params = list(inspect.signature(fn).parameters.values())[1 if skip_self else 0:]
    got_positional = [p for p in params if p.kind == P_OR_K]
    assert [(p.name) for p in got_positional] == [n for n, _d in positional], \
        f"{fn.__qualname__}: positional parameters {[p.name for p in got_positional]}"
    for p, (name, default) in zip(got_positional, positional):
        assert _same_default(p.default, default), f"{fn.__qualname__}({name}=...) default {p.default!r} != {default!r}"
    by_name = {p.name: p for p in params}
    for name, default in keyword_only:
        assert name in by_name and by_name[name].kind == KW_ONLY, f"{fn.__qualname__}: {name} keyword-only"
        assert _same_default(by_name[name].default, default), f"{fn.__qualname__}({name}=...) default"
    seed_names = {n for n, _d in positional + keyword_only}
    for p in params:
        if p.name not in seed_names:
            assert p.kind in (KW_ONLY, VAR_KW) and (p.kind == VAR_KW or p.default is not _), \
                f"{fn.__qualname__}: extra parameter {p.name} must be keyword-only with a default"


@pytest.mark.parametrize("name", sorted(SEED_UTILS))
def test_utils_signature_is_the_seeds(name):
    assert name in utils.__all__
    _check_signature(getattr(utils, name), *SEED_UTILS[name])


def test_mdscaling_accepts_every_seed_keyword():
    # The seed's MDScaling(pre_dist_mat, **kwargs) forwarded to mdscaling_*; ours names each of them.
    params = inspect.signature(utils.MDScaling).parameters
    assert list(params)[0] == "pre_dist_mat"
    for name, default in _MDSCALING[1:]:
        assert name in params
    assert params["backend"].default == "auto" and params["backend"].kind == KW_ONLY


def test_alphafold2_signature_and_constants():
    assert af2_ext.Alphafold2 is model.Alphafold2
    init = inspect.signature(model.Alphafold2.__init__).parameters
    for name, default in SEED_ALPHAFOLD2_INIT:
        assert init[name].kind == KW_ONLY and (default is _ or init[name].default == default), name
    _check_signature(model.Alphafold2.forward, [("seq", _), ("msa", None), ("embedds", None), ("mask", None),
                                                ("msa_mask", None)], [], skip_self=True)
    assert (model.MAX_NUM_MSA, model.NUM_AMINO_ACIDS, model.NUM_EMBEDDS_TR, model.DISTOGRAM_BUCKETS) == (20, 21, 1280,
                                                                                                       37)
    _check_signature(model.FeedForward.__init__, [("dim", _), ("mult", 4), ("dropout", 0.0)], [], skip_self=True)


def test_utils_constants():
    torch.testing.assert_close(utils.DISTANCE_THRESHOLDS, torch.linspace(2, 20, steps=37))
    assert (utils.NUM_COORDS_PER_RES, utils.GLOBAL_PAD_CHAR) == (14, 0)
    assert utils.BB_BUILD_INFO["BONDLENS"]["c-o"] == 1.229
    assert utils.BB_BUILD_INFO["BONDANGS"]["ca-c-o"] == 2.0944


# ----------------------------------------------------------------------------------------------------------
# Structures: a random chain with N, CA, C per residue and real bond lengths
# ----------------------------------------------------------------------------------------------------------


def _helix_backbone(residues: int) -> torch.Tensor:
    """(residues * 3, 3) N, CA, C of an ideal right-handed alpha helix (phi = -57, psi = -47 degrees), built
    with the seed's NeRF (theta = pi - bond angle)."""
    lengths = {"N": 1.329, "CA": 1.458, "C": 1.525}  # bond into each atom: C-N, N-CA, CA-C
    bond_angles = {"N": math.radians(121.7), "CA": math.radians(111.2), "C": math.radians(116.2)}
    torsions = {"N": math.radians(-47), "CA": math.radians(180), "C": math.radians(-57)}  # psi, omega, phi
    points = [torch.tensor([0.0, 1.4, 0.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
              torch.tensor([1.5, 0.0, 0.0], dtype=torch.float64)]  # N, CA, C of residue 1 (approximate angle)
    for _r in range(residues - 1):
        for atom in ("N", "CA", "C"):
            points.append(utils.nerf_torch(points[-3], points[-2], points[-1], lengths[atom],
                                           math.pi - bond_angles[atom], torsions[atom]))
    return torch.stack(points)


HELIX = _helix_backbone(12)  # [36, 3]


def _distances(points: torch.Tensor) -> torch.Tensor:
    return torch.cdist(points, points)[None]  # [1, n, n]


# ----------------------------------------------------------------------------------------------------------
# The seed's 14-slot atom layout (sidechainnet 0.x), NeRF
# ----------------------------------------------------------------------------------------------------------


def test_scn_backbone_mask_seed_call():
    seq = torch.randint(0, 20, (1, 5))
    n_mask, ca_mask = utils.scn_backbone_mask(seq, boolean=True, l_aa=3)
    assert n_mask.shape == ca_mask.shape == (1, 15)
    assert torch.nonzero(n_mask[0]).flatten().tolist() == [0, 3, 6, 9, 12]
    assert torch.nonzero(ca_mask[0]).flatten().tolist() == [1, 4, 7, 10, 13]
    n14, ca14 = utils.scn_backbone_mask(seq[0])  # the seed's default: 14 slots per residue
    assert n14.shape == (70,) and torch.nonzero(n14).flatten().tolist() == [0, 14, 28, 42, 56]
    assert torch.nonzero(ca14).flatten().tolist() == [1, 15, 29, 43, 57]
    n_idx, ca_idx = utils.scn_backbone_mask(seq[0], boolean=False, l_aa=3)
    assert n_idx.flatten().tolist() == [0, 3, 6, 9, 12] and ca_idx.flatten().tolist() == [1, 4, 7, 10, 13]
    # Only the shape is read, as the seed: any dtype.
    n_float, _ca = utils.scn_backbone_mask(torch.randn(7), l_aa=3)
    assert n_float.shape == (21,)


def test_scn_cloud_mask_seed_call():
    seq = torch.randint(0, 20, (2, 9))
    mask = utils.scn_cloud_mask(seq)
    assert mask.shape == (2, 9, 14) and mask.dtype == torch.bool
    assert mask[..., :4].all(), "every residue has N, CA, C, O"
    assert utils.scn_cloud_mask(seq, boolean=False).shape[1] == 3  # nonzero indices (batch, residue, slot)


def test_sidechain_container_seed_call():
    bb = HELIX[None].float()  # [1, 36, 3]
    out = utils.sidechain_container(bb, place_oxygen=True)
    assert out.shape == (1, 12, 14, 3)
    torch.testing.assert_close(out[0, :, :3], bb[0].reshape(12, 3, 3))
    c = bb[0].reshape(12, 3, 3)[:, 2]
    torch.testing.assert_close(out[0, :, 4:], c[:, None].expand(12, 10, 3))  # slots 4.. = C, as the seed
    torch.testing.assert_close((out[0, :, 3] - c).norm(dim=-1), torch.full((12,), 1.229))
    plain = utils.sidechain_container(bb)
    torch.testing.assert_close(plain[0, :, 3:], c[:, None].expand(12, 11, 3))  # no O: slots 3.. = C
    assert utils.sidechain_container(bb, False, 14, 0).shape == (1, 12, 14, 3)  # all positional


def test_difference_sidechain_container_oxygen_at_120_degrees():
    # The seed passed the CA-C-O bond angle as its NeRF theta (the supplement): O at 60 degrees from CA.
    out = utils.sidechain_container(HELIX[None], place_oxygen=True)[0]  # [12, 14, 3]
    ca, c, o = out[:, 1], out[:, 2], out[:, 3]
    u, v = ca - c, o - c
    angle = torch.arccos((u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1)))
    torch.testing.assert_close(angle, torch.full_like(angle, 2.0944))


def test_nerf_torch_seed_convention():
    a, b, c = torch.tensor([1.0, 1.0, 0.0]), torch.zeros(3), torch.tensor([1.0, 0.0, 0.0])
    # R = [x, y, z] here: c - b is along x, the plane a-b-c is z = 0 with normal +z.
    for theta, chi, l in ((0.3, 1.1, 1.5), (2.0, -2.5, 1.0), (-1.0, 0.4, 2.0)):
        d = utils.nerf_torch(a, b, c, l, theta, chi)
        expected = c + l * torch.tensor([math.cos(theta), math.sin(theta) * math.cos(chi),
                                         math.sin(theta) * math.sin(chi)])
        torch.testing.assert_close(d, expected)
    # theta = 0 continues straight along c - b; theta is the angle between (c - b) and (d - c).
    torch.testing.assert_close(utils.nerf_torch(a, b, c, 2.0, 0.0, 0.7), torch.tensor([3.0, 0.0, 0.0]))
    d = utils.nerf_torch(a, b, c, 1.3, 1.9, -2.2)
    u, v = c - b, d - c
    assert float(torch.arccos((u @ v) / (u.norm() * v.norm()))) == pytest.approx(1.9, abs=1e-5)
    assert float(utils.get_dihedral_torch(a, b, c, d)) == pytest.approx(-2.2, abs=1e-5)
    # Batched angles as tensors; out-of-range theta raises as the seed.
    thetas = torch.tensor([0.5, 1.5, 2.5])
    assert utils.nerf_torch(a, b, c, torch.ones(3), thetas, torch.zeros(3)).shape == (3, 3)
    with pytest.raises(ValueError, match="theta"):
        utils.nerf_torch(a, b, c, 1.0, torch.tensor([0.1, 3.5]), 0.0)


def test_get_dihedral_numpy_and_torch():
    points = [np.random.default_rng(i).normal(size=(5, 3)) for i in range(4)]
    got = utils.get_dihedral_numpy(*points)
    assert isinstance(got, np.ndarray) and got.shape == (5,)
    torch.testing.assert_close(torch.from_numpy(got),
                               utils.get_dihedral_torch(*(torch.from_numpy(p) for p in points)))
    b1, b2, b3 = (points[1] - points[0]), (points[2] - points[1]), (points[3] - points[2])
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)  # atan2 form (Wikipedia, "In polymer physics")
    expected = np.arctan2(np.linalg.norm(b2, axis=-1) * (b1 * n2).sum(-1), (n1 * n2).sum(-1))
    np.testing.assert_allclose(got, expected, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# Distances -> coordinates
# ----------------------------------------------------------------------------------------------------------


def test_center_distogram_seed_call():
    distogram = torch.randn(1, 8, 8, 37).softmax(dim=-1)
    central, weights = utils.center_distogram_torch(distogram)
    assert central.shape == weights.shape == (1, 8, 8)
    central_median, _w = utils.center_distogram_torch(distogram, center="median", wide="var")
    assert central_median.shape == (1, 8, 8)


def test_mds_torch_and_numpy(capsys):
    dist = _distances(HELIX)  # [1, 36, 36]
    coords, stresses = utils.mds_torch(dist, iters=20)
    assert isinstance(coords, torch.Tensor) and coords.shape == (1, 3, 36) and stresses.shape[0] == 1
    assert "stress" in capsys.readouterr().out, "verbose=2 by default, as the seed"
    coords_np, stresses_np = utils.mds_numpy(dist.numpy(), iters=20, verbose=0)
    assert isinstance(coords_np, np.ndarray) and coords_np.shape == (1, 3, 36)
    assert isinstance(stresses_np, np.ndarray)
    refit = torch.cdist(coords[0].T, coords[0].T)
    assert float((refit - dist[0]).abs().max()) < 1e-3, "the helix's distances are met"


def test_mdscaling_seed_shapes():
    dist = _distances(HELIX)
    seq = torch.randint(0, 20, (12,))
    n_mask, ca_mask = utils.scn_backbone_mask(seq, boolean=True, l_aa=3)
    coords, stresses = utils.mdscaling_torch(dist, iters=5, verbose=0)
    assert coords.shape == (3, 36) and stresses.dim() == 1  # fix_mirror=0: (3, N)
    mirrored = dist  # distances cannot tell the mirror: the chirality comes from phi
    coords, stresses = utils.mdscaling_torch(mirrored, iters=5, fix_mirror=2, N_mask=n_mask, CA_mask=ca_mask,
                                             verbose=0)
    assert coords.shape == (1, 3, 36)
    assert float(utils.calc_phis_torch(coords, n_mask, ca_mask)[0]) >= 0.5
    coords_np, _s = utils.mdscaling_numpy(dist.numpy(), iters=5, fix_mirror=1, N_mask=n_mask, CA_mask=ca_mask,
                                          verbose=0)
    assert isinstance(coords_np, np.ndarray) and coords_np.shape == (1, 3, 36)
    coords_auto, _s = utils.MDScaling(dist.numpy(), iters=5, fix_mirror=1, N_mask=n_mask, CA_mask=ca_mask)
    assert isinstance(coords_auto, np.ndarray) and coords_auto.shape == (1, 3, 36)


def test_mdscaling_seed_convention_without_mirror_fixing():
    # The seed's MDScaling((1, N, N)) went to mdscaling_*, which returned (3, N) and a flat history when
    # fix_mirror=0, for either backend.
    dist = _distances(HELIX)  # [1, 36, 36]
    coords, stresses = utils.MDScaling(dist, iters=5)
    assert isinstance(coords, torch.Tensor) and coords.shape == (3, 36) and stresses.dim() == 1
    coords_np, stresses_np = utils.MDScaling(dist.numpy(), iters=5, fix_mirror=0)
    assert isinstance(coords_np, np.ndarray) and coords_np.shape == (3, 36) and stresses_np.ndim == 1
    forced, _s = utils.MDScaling(dist.numpy(), iters=5, backend="torch")
    assert isinstance(forced, torch.Tensor) and forced.shape == (3, 36)
    torch.testing.assert_close(coords, utils.mdscaling_torch(dist, iters=5, verbose=0)[0])
    refit = torch.cdist(coords.T, coords.T)
    assert float((refit - dist[0]).abs().max()) < 0.1, "the helix's distances are met"


def test_fix_mirrors_picks_negative_phi():
    seq = torch.zeros(12, dtype=torch.long)
    n_mask, ca_mask = utils.scn_backbone_mask(seq, l_aa=3)
    right = HELIX.T  # [3, 36] right-handed helix: phi = -57
    left = right * torch.tensor([[1.0], [1.0], [-1.0]], dtype=right.dtype)
    stresses = torch.tensor([[3.0, 2.0], [5.0, 4.0]])
    best, best_stress = utils.fix_mirrors_torch(torch.stack([left, right]), stresses, n_mask, ca_mask)
    assert best.shape == (1, 3, 36)
    torch.testing.assert_close(best[0], right)
    torch.testing.assert_close(best_stress, stresses[1])
    best_np, _s = utils.fix_mirrors_numpy(torch.stack([right, left]).numpy(), stresses, n_mask, ca_mask)
    assert isinstance(best_np, np.ndarray)
    np.testing.assert_allclose(best_np[0], right.numpy())


# ----------------------------------------------------------------------------------------------------------
# Alignment and metrics
# ----------------------------------------------------------------------------------------------------------


def _rotated(points: torch.Tensor) -> torch.Tensor:
    q, _r = torch.linalg.qr(torch.randn(3, 3, dtype=points.dtype, generator=torch.Generator().manual_seed(1)))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q @ points + torch.tensor([[1.0], [-2.0], [3.0]], dtype=points.dtype)


def test_kabsch_torch_and_numpy():
    x = HELIX.T  # [3, 36]
    y = _rotated(x)
    aligned, y_centered = utils.kabsch_torch(x, y)
    assert aligned.shape == y_centered.shape == (3, 36)
    torch.testing.assert_close(aligned, y_centered)
    torch.testing.assert_close(y_centered.mean(dim=-1), torch.zeros(3, dtype=x.dtype))
    aligned_np, y_np = utils.kabsch_numpy(x.numpy(), y.numpy())
    assert isinstance(aligned_np, np.ndarray)
    np.testing.assert_allclose(aligned_np, y_np, atol=1e-8)


def test_metric_pairs_batched():
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    y = x + 0.1 * torch.randn(2, 3, 20, dtype=torch.float64)
    for name in ("rmsd", "tmscore"):
        t = getattr(utils, f"{name}_torch")(x, y)
        n = getattr(utils, f"{name}_numpy")(x.numpy(), y.numpy())
        assert isinstance(t, torch.Tensor) and t.shape == (2,) and isinstance(n, np.ndarray)
        np.testing.assert_allclose(n, t.numpy())
    gdt = utils.gdt_torch(x, y, [1, 2, 4, 8])
    assert gdt.shape == (2,) and bool((gdt == 1).all())
    assert isinstance(utils.gdt_numpy(x.numpy(), y.numpy(), [0.5, 1, 2, 4]), np.ndarray)
    assert torch.equal(utils.tmscore_torch(x, x), torch.ones(2, dtype=x.dtype))


def test_wrappers_return_the_kind_given():
    a = torch.randn(3, 16)
    b = a + 0.5
    for fn in (utils.RMSD, utils.GDT, utils.TMscore):
        assert isinstance(fn(a, b), torch.Tensor) and fn(a, b).shape == (1,)
        assert isinstance(fn(a.numpy(), b.numpy()), np.ndarray)
        assert isinstance(fn(a.numpy(), b.numpy(), backend="torch"), torch.Tensor)
        assert isinstance(fn(a, b, backend="numpy"), np.ndarray)
    aligned, centered = utils.Kabsch(a.numpy(), b.numpy())
    assert isinstance(aligned, np.ndarray) and aligned.shape == (3, 16)
    # GDT: mode decides the cutoffs when none are given, as the seed.
    shifted = a + torch.tensor([[0.75], [0.0], [0.0]])
    assert float(utils.GDT(a, shifted)[0]) == 1.0
    assert float(utils.GDT(a, shifted, mode="HA")[0]) == 0.75
    assert float(utils.GDT(a, shifted, cutoffs=[0.5, 1.0])[0]) == 0.5  # explicit cutoffs: an addition


def test_difference_rmsd_is_not_divided_by_sqrt3():
    a = torch.zeros(1, 3, 10)
    b = a + torch.tensor([[[1.0], [0.0], [0.0]]])  # every point 1 Å away
    assert float(utils.rmsd_torch(a, b)[0]) == pytest.approx(1.0)  # the seed: 1 / sqrt(3)


def test_difference_gdt_weights_are_a_weighted_mean():
    a = torch.zeros(1, 3, 4)
    b = a + torch.tensor([[[1.5], [0.0], [0.0]]])  # 1.5 Å: outside 1, inside 2, 4, 8
    got = float(utils.gdt_torch(a, b, [1, 2, 4, 8], weights=[1.0, 1.0, 1.0, 1.0])[0])
    assert got == pytest.approx(0.75)
    assert float(utils.gdt_torch(a, b, [1, 2, 4, 8], weights=[2.0, 2.0, 2.0, 2.0])[0]) == pytest.approx(0.75)


def test_difference_tmscore_short_chain_d0():
    a = torch.zeros(1, 3, 10)
    b = a + torch.tensor([[[0.5], [0.0], [0.0]]])
    score = float(utils.tmscore_torch(a, b)[0])  # the seed's d0 <= 0 here: NaN or negative
    assert score == pytest.approx(0.5)  # d0 = 0.5 Å


# ----------------------------------------------------------------------------------------------------------
# Helpers and decorators, used the way the seed's own module used them
# ----------------------------------------------------------------------------------------------------------


def test_expand_dims_to():
    t = torch.zeros(4, 5)
    assert utils.expand_dims_to(t, 1).shape == (1, 4, 5)
    assert utils.expand_dims_to(t).shape == (1, 1, 1, 4, 5)
    assert utils.expand_dims_to(np.zeros((4, 5)), 2).shape == (1, 1, 4, 5)
    assert utils.expand_dims_to(t, 0) is t


def test_backend_decorators_compose_as_in_the_seed():
    calls = []

    def torch_fn(x, y, scale=1.0):
        calls.append("torch")
        return (x - y).sum() * scale

    def numpy_fn(x, y, scale=1.0):
        calls.append("numpy")
        return (x - y).sum() * scale

    @utils.set_backend_kwarg
    @utils.invoke_torch_or_numpy(torch_fn, numpy_fn)
    @utils.expand_arg_dims(dim_len=3)
    def diff(x, y, scale=1.0):
        assert x.ndim == 3
        return x, y, {"scale": scale}

    x = torch.ones(3, 4)
    assert float(diff(x, x * 0, scale=2.0)) == 24.0 and calls == ["torch"]
    assert isinstance(diff(x.numpy(), x.numpy() * 0), np.floating) and calls[-1] == "numpy"
    assert isinstance(diff(x.numpy(), x.numpy(), backend="torch"), torch.Tensor)
    with pytest.raises(ValueError, match="backend"):
        diff(x, x, backend="jax")


def test_download_pdb_offline_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match="files.rcsb.org"):
        utils.download_pdb("1UBQ", str(tmp_path / "1UBQ.pdb"))
    assert not (tmp_path / "1UBQ.pdb").exists(), "no empty file left behind"


def test_mdtraj_helpers_say_what_they_need(tmp_path):
    try:
        import mdtraj  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="mdtraj"):
            utils.clean_pdb(str(tmp_path / "x.pdb"))
        with pytest.raises(ImportError, match="mdtraj"):
            utils.custom2pdb(torch.zeros(3, 5), "TBM#1UBQ_1_A", str(tmp_path / "out.pdb"))
    else:
        pytest.skip("mdtraj is installed: the offline message is not reachable")


def test_alphafold2_seed_call_shape():
    torch.manual_seed(0)
    net = af2_ext.Alphafold2(dim=32, depth=1, heads=2, dim_head=16, max_seq_len=32)
    seq = torch.randint(0, 21, (1, 16))
    msa = torch.randint(0, 21, (1, 2, 16))
    mask = torch.ones_like(seq).bool()
    msa_mask = torch.ones_like(msa).bool()
    logits = net(seq, msa, mask=mask, msa_mask=msa_mask)
    assert logits.shape == (1, 16, 16, 37)
