"""Structure scores: the standard TM-score and GDT-TS, each under the superposition that maximises it, and the
superposition-free lDDT-Cα and distogram accuracy. (The seed's ``RMSD`` / ``GDT`` / ``TMscore``, which score the
coordinates as given, are in :mod:`af2_ext.geometry` beside ``Kabsch``.)

TM-score and GDT are defined over all superpositions of a model on its reference, with the residue correspondence
fixed (residue i on residue i). The seed's ``TMscore`` / ``GDT`` score the coordinates as given, usually after
the RMSD-optimal (Kabsch) superposition; that superposition is pulled towards the wrong parts of a
model, so for anything but a near-perfect model it understates both. These functions search the superposition
as the programs that define the scores do, vectorised over all starting points:

- :func:`tm_score`: the TM-score program's search (Zhang & Skolnick 2004; ``TMscore8_search`` of TM-score and
  TM-align): seed superpositions on fragments of L, L/2, L/4, ... down to 4 residues at every position, each
  extended by up to 20 rounds of "superpose on the residues within d0_search + 1 Å, re-select"; the best score
  met anywhere is the TM-score.
- :func:`gdt_ts`: GDT (Zemla et al. 1999; Zemla 2003, LGA): for each cutoff, the largest share of residues
  within the cutoff under one superposition, found LGA-style by iterating "superpose on the residues within the
  cutoff, re-select" from the same seed fragments; the superpositions met by the TM-score search count too.
  GDT-TS is the mean over 1, 2, 4 and 8 Å.

Both are searches, as in those programs, so each value is a lower bound of the true maximum (every value is met
by an actual superposition, the Kabsch one among them, so neither is ever below the seed's score after Kabsch).
``python_tests/test_structure_scores.py`` checks the TM-score against TM-align (within 0.01) and GDT against
models with a known answer and against a random search of refined superpositions (at most 2 residues or 2 %
behind it at any cutoff). A few hundred residues take about 0.1 s (TM-score) and 0.4 s (GDT-TS) on one CPU core.
Coordinates are the seed's layout, ``(3, N)`` or ``(B, 3, N)``, torch or numpy.

Without a superposition: :func:`lddt_ca`, the lDDT of Cα coordinates (Mariani et al. 2013; ``(B, N, 3)``
coordinates), and :func:`distogram_accuracy`, the share of labelled pairs whose most likely distogram class is
the true one.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from af2_ext._backend import as_tensor, check_finite, numpy_float_dtype, to_output, wants_numpy
from af2_ext.geometry import pairwise_distances

__all__ = ["TM_SCORE_DEFINITION", "GDT_TS_DEFINITION", "GDT_TS_CUTOFFS", "tm_score_d0", "tm_score", "gdt_ts",
           "lddt_ca", "distogram_accuracy"]

TM_SCORE_DEFINITION = ("TM-score (Zhang & Skolnick 2004), residue i on residue i, under the superposition that "
                       "maximises it, searched as the TM-score program does; normalised by the reference's length")
GDT_TS_DEFINITION = ("GDT-TS (Zemla 2003, LGA): mean over 1, 2, 4, 8 Å of the largest share of residues within "
                     "the cutoff under one superposition, searched per cutoff LGA-style")
GDT_TS_CUTOFFS = (1.0, 2.0, 4.0, 8.0)

# The TM-score program's search parameters (TMscore8_search): fragment lengths L, L/2, ... (at most 6 of them)
# down to 4 residues, 20 extension rounds, a selection threshold relaxed in 0.5 Å steps until 3 residues pass.
_MIN_FRAGMENT = 4
_MAX_FRAGMENT_LENGTHS = 6
_ROUNDS = 20
_MIN_SELECTED = 3
_RELAX_STEP = 0.5
_MAX_SEED_ELEMENTS = 1 << 22  # seeds x residues per batch: bounds memory for long chains


def tm_score_d0(length: int) -> float:
    """TM-score's distance scale d0 for a reference of ``length`` residues: ``1.24 (L - 15)^(1/3) - 1.8`` for
    L > 21, at least 0.5 Å (TM-score and TM-align's ``d0_min``)."""
    return max(0.5, 1.24 * (length - 15) ** (1.0 / 3.0) - 1.8) if length > 21 else 0.5


def _structures(model, reference) -> tuple[torch.Tensor, torch.Tensor, bool, bool, object]:
    """(B, N, 3) float64 CPU copies of both, whether the input was unbatched, numpy, and the numpy dtype."""
    tensors = []
    for name, value in (("model", model), ("reference", reference)):
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf":
                raise TypeError(f"{name} must be a real numeric array, got dtype {value.dtype}")
            value = torch.from_numpy(np.ascontiguousarray(value))
        elif not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
        if value.is_complex():
            raise TypeError(f"{name} must be real, got {value.dtype}")
        tensors.append(value)
    m, r = tensors
    if m.shape != r.shape:
        raise ValueError(f"model and reference must have the same shape, got {tuple(m.shape)} and {tuple(r.shape)}")
    if m.dim() not in (2, 3) or m.shape[-2] != 3 or m.shape[-1] == 0:
        raise ValueError(f"model and reference must be (3, N) or (B, 3, N) with N >= 1 (the seed's layout), "
                         f"got {tuple(m.shape)}")
    out = []
    for name, t in (("model", m), ("reference", r)):
        t = t.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")
        out.append(t.reshape(-1, *t.shape[-2:]).transpose(-1, -2))  # [b, n, 3]
    numpy_dtype = model.dtype if isinstance(model, np.ndarray) and model.dtype.kind == "f" else None
    return out[0], out[1], m.dim() == 2, isinstance(model, np.ndarray) and isinstance(reference, np.ndarray), \
        numpy_dtype


def _result(values: torch.Tensor, like, unbatched: bool, to_numpy: bool, numpy_dtype):
    """Scores in the caller's kind: torch in the model's float dtype (float32 unless float64), or numpy."""
    if unbatched:
        values = values[0]
    if to_numpy:
        return values.numpy().astype(numpy_dtype or np.float64, copy=False)
    dtype = like.dtype if isinstance(like, torch.Tensor) and like.dtype == torch.float64 else torch.float32
    return values.to(device=like.device if isinstance(like, torch.Tensor) else "cpu", dtype=dtype)


def _fragment_seeds(n: int) -> torch.Tensor:
    """(S, N) bool: the TM-score program's seed fragments, every window of each length L, L/2, L/4, ... down to
    4 (fewer residues: all of them), at most 6 lengths."""
    shortest = min(_MIN_FRAGMENT, n)
    lengths = []
    for k in range(_MAX_FRAGMENT_LENGTHS - 1):
        length = int(n / 2 ** k)
        if length <= shortest:
            lengths.append(shortest)
            break
        lengths.append(length)
    else:
        lengths.append(shortest)
    position = torch.arange(n)
    rows = []
    for length in dict.fromkeys(lengths):
        start = torch.arange(n - length + 1)[:, None]
        rows.append((position >= start) & (position < start + length))  # [n - length + 1, n]
    return torch.cat(rows)


def _det3(m: torch.Tensor) -> torch.Tensor:
    """Determinants of (S, 3, 3) matrices (the triple product: cheaper than an LU per matrix)."""
    return (m[:, 0] * torch.linalg.cross(m[:, 1], m[:, 2], dim=-1)).sum(dim=-1)


class _Pair:
    """A model x and reference y (N, 3), centred together, with the per-residue products the batched
    superpositions need: x_i y_j (for the covariances) and [x, y, y_j x_k] (for the distances)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x - x.mean(dim=0), y - y.mean(dim=0)  # translations change nothing; this keeps it exact
        self.xy = (self.x[:, :, None] * self.y[:, None, :]).reshape(-1, 9)  # [n, 9]
        yx = (self.y[:, :, None] * self.x[:, None, :]).reshape(-1, 9)
        self.features = torch.cat([self.x, self.y, yx], dim=1).T.contiguous()  # [15, n]
        self.norms = self.x.square().sum(dim=-1) + self.y.square().sum(dim=-1)  # [n]

    def distances_sq(self, subsets: torch.Tensor) -> torch.Tensor:
        """Squared distances (S, N) between y and x moved by the Kabsch superposition (a proper rotation) of
        each subset's residues of x onto y's; subsets (S, N) 0/1."""
        w = subsets.to(self.x.dtype)
        count = w.sum(dim=-1).clamp_min(1)[:, None]  # [s, 1]
        cx, cy = (w @ self.x) / count, (w @ self.y) / count  # [s, 3]
        covariance = (w @ self.xy).view(-1, 3, 3) - count[:, :, None] * cx[:, :, None] * cy[:, None, :]
        u, _, vh = torch.linalg.svd(covariance)  # [s, 3, 3] each
        sign = torch.sign(_det3(u) * _det3(vh))
        vh = torch.cat([vh[:, :2], vh[:, 2:] * torch.where(sign == 0, 1.0, sign)[:, None, None]], dim=1)
        rotation = vh.transpose(-1, -2) @ u.transpose(-1, -2)  # [s, 3, 3]: x - cx -> y - cy
        # |R (x_i - cx) + cy - y_i|^2 expanded, so that one (S, 15) @ (15, N) product gives every distance.
        r_cx = (rotation @ cx[:, :, None])[..., 0]  # [s, 3]
        rt_cy = (rotation.transpose(-1, -2) @ cy[:, :, None])[..., 0]
        constant = cx.square().sum(-1) + cy.square().sum(-1) - 2 * (cy * r_cx).sum(-1)  # [s]
        coefficients = torch.cat([rt_cy - cx, r_cx - cy, -rotation.reshape(-1, 9)], dim=1)  # [s, 15]
        dist_sq = self.norms + constant[:, None] + 2 * (coefficients @ self.features)
        return dist_sq.clamp_min(0)


def _select(dist_sq: torch.Tensor, cut: float) -> torch.Tensor:
    """TM-score's ``score_fun8`` selection: residues closer than ``cut``, the cut raised in 0.5 Å steps for a
    row with fewer than 3 (when there are more than 3 residues). (S, N) bool."""
    selected = dist_sq < cut * cut
    n = dist_sq.shape[-1]
    short = selected.sum(dim=-1) < _MIN_SELECTED
    if n > _MIN_SELECTED and bool(short.any()):
        third = dist_sq[short].kthvalue(_MIN_SELECTED, dim=-1).values.sqrt()  # [r]
        steps = torch.floor((third - cut) / _RELAX_STEP).clamp_min(0) + 1
        relaxed = cut + _RELAX_STEP * steps
        relaxed = torch.where(third.square() < relaxed.square(), relaxed, relaxed + _RELAX_STEP)  # rounding
        selected[short] = dist_sq[short] < relaxed[:, None].square()
    empty = ~selected.any(dim=-1)  # only with <= 3 residues: superpose on all of them
    selected[empty] = True
    return selected


def _search(x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor, first_cut: float, cut: float,
            measure: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The largest values (K,) of ``measure`` ((S, N) squared distances -> (S, K)) over every superposition the
    iterative search meets: each seed subset's, then up to 20 rounds of "superpose on the selection, select the
    residues within ``cut``" (the first selection within ``first_cut``). All rows advance together, so rows that
    reach the same selection have the same future and are merged; a row whose selection no longer changes is
    done."""
    pair = _Pair(x, y)
    best = None
    chunk = max(1, _MAX_SEED_ELEMENTS // x.shape[0])
    for part in seeds.split(chunk):
        dist_sq = pair.distances_sq(part)
        values = measure(dist_sq).amax(dim=0)
        best = values if best is None else torch.maximum(best, values)
        selection = torch.unique(_select(dist_sq, first_cut), dim=0)
        for _ in range(_ROUNDS):
            dist_sq = pair.distances_sq(selection)
            best = torch.maximum(best, measure(dist_sq).amax(dim=0))
            following = _select(dist_sq, cut)
            moving = (following != selection).any(dim=-1)
            if not bool(moving.any()):
                break
            selection = torch.unique(following[moving], dim=0)
    return best


def _tm_measure(d0: float, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda dist_sq: ((1.0 / (1.0 + dist_sq / (d0 * d0))).sum(dim=-1) / n)[:, None]


def _search_cut(d0: float) -> float:
    """TM-score's ``d0_search``: d0 clamped to [4.5, 8] Å."""
    return min(8.0, max(4.5, d0))


def tm_score(model, reference):
    """TM-score of ``model`` against ``reference`` with residue i on residue i, under the superposition that
    maximises it (Zhang & Skolnick, Proteins 57:702, 2004), searched as the TM-score program does.

    ``TM = max over superpositions of (1/L) sum_i 1 / (1 + (d_i / d0)^2)``, L = N the reference's length,
    ``d0 = 1.24 (L - 15)^(1/3) - 1.8`` (:func:`tm_score_d0`). The search is TM-score's ``TMscore8_search``: seed
    superpositions on fragments of L, L/2, ... down to 4 residues at every position, each extended by up to 20
    rounds of superposing on the residues within ``d0_search`` (d0 clamped to [4.5, 8] Å) ± 1 Å; the best value
    met is returned. It agrees with TM-align run with the identity alignment to about 0.01 (TM-align's final
    search keeps only pairs within 5 Å of its alignment's superposition).

    Args:
        model, reference: (3, N) or (B, 3, N) Cα coordinates in Å (the seed's layout), torch or numpy.

    Returns:
        (B,) in (0, 1], or a 0-d value for (3, N) input; numpy for numpy input. Unlike ``TMscore`` (the seed's,
        which scores the coordinates as given) no superposition is needed beforehand.
    """
    x, y, unbatched, to_numpy, numpy_dtype = _structures(model, reference)
    n = x.shape[1]
    d0 = tm_score_d0(n)
    seeds = _fragment_seeds(n)
    search = _search_cut(d0)
    scores = torch.stack([_search(x[b], y[b], seeds, search - 1, search + 1, _tm_measure(d0, n))[0]
                          for b in range(x.shape[0])])
    return _result(scores, model, unbatched, to_numpy, numpy_dtype)


def gdt_ts(model, reference, *, cutoffs: Sequence[float] = GDT_TS_CUTOFFS):
    """GDT-TS of ``model`` against ``reference`` with residue i on residue i: the mean over the cutoffs of the
    largest share of residues within the cutoff under one superposition (Zemla et al., Proteins Suppl 3:22,
    1999; Zemla, Nucleic Acids Res 31:3370, 2003), each cutoff's superposition searched separately.

    The search is LGA's iterative one: from each seed fragment (the TM-score program's: L, L/2, ... down to 4
    residues, every position) superpose, select the residues within the cutoff (at least 3), superpose on them,
    and repeat until the selection stops changing (at most 20 rounds). The superpositions met by the TM-score
    search (:func:`tm_score`) are counted too. A residue counts when its distance is <= the cutoff.

    Args:
        model, reference: (3, N) or (B, 3, N) Cα coordinates in Å (the seed's layout), torch or numpy.
        cutoffs: distance cutoffs in Å; the default (1, 2, 4, 8) is GDT-TS, (0.5, 1, 2, 4) gives GDT-HA.

    Returns:
        (B,) in [0, 1], or a 0-d value for (3, N) input; numpy for numpy input. Unlike ``GDT`` (the seed's,
        which scores the coordinates as given) no superposition is needed beforehand.
    """
    x, y, unbatched, to_numpy, numpy_dtype = _structures(model, reference)
    try:
        limits = torch.as_tensor(cutoffs, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"cutoffs must be a non-empty sequence of positive distances in Å, got {cutoffs!r}") \
            from error
    if limits.numel() == 0 or not bool(torch.isfinite(limits).all()) or not bool((limits > 0).all()):
        raise ValueError(f"cutoffs must be a non-empty sequence of positive distances in Å, got {cutoffs!r}")
    n = x.shape[1]
    seeds = _fragment_seeds(n)
    search = _search_cut(tm_score_d0(n))

    def within(limit_sq: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda dist_sq: (dist_sq[:, :, None] <= limit_sq).sum(dim=1).to(torch.float64)  # [s, k]

    scores = []
    for b in range(x.shape[0]):
        best = _search(x[b], y[b], seeds, search - 1, search + 1, within(limits.square()))  # [k]
        for k, cutoff in enumerate(limits.tolist()):
            found = _search(x[b], y[b], seeds, cutoff, cutoff, within(limits[k:k + 1].square()))
            best[k] = torch.maximum(best[k], found[0])
        scores.append(best.mean() / n)
    return _result(torch.stack(scores), model, unbatched, to_numpy, numpy_dtype)


# ----------------------------------------------------------------------------------------------------------
# Superposition-free scores: lDDT-Cα, distogram accuracy
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
    p, p_numpy = as_tensor("pred", pred)
    t, t_numpy = as_tensor("true", true)
    if p.shape != t.shape:
        raise ValueError(f"pred and true must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    if p.dim() not in (2, 3) or p.shape[-1] != 3:
        raise ValueError(f"pred and true must be (B, N, 3) or (N, 3), got {tuple(p.shape)}")
    if p.device != t.device:
        raise ValueError(f"pred and true must be on the same device, got {p.device} and {t.device}")
    unbatched = p.dim() == 2
    dtype = torch.float64 if torch.float64 in (p.dtype, t.dtype) else torch.float32
    p, t = p.to(dtype), t.to(dtype)
    check_finite("pred", p)
    check_finite("true", t)
    if unbatched:
        p, t = p.unsqueeze(0), t.unsqueeze(0)  # [1, n, 3]
    batch, n, _ = p.shape
    if mask is None:
        present = torch.ones(batch, n, dtype=torch.bool, device=p.device)
    else:
        m, _ = as_tensor("mask", mask)
        expected = (n,) if unbatched else (batch, n)
        if tuple(m.shape) != expected:
            raise ValueError(f"mask must be {expected}, got {tuple(m.shape)}")
        present = m.to(p.device).bool().reshape(batch, n)
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not cutoff > 0:
        raise ValueError(f"cutoff must be a positive distance, got {cutoff!r}")
    tolerances = torch.as_tensor(thresholds, dtype=dtype, device=p.device).flatten()
    if tolerances.numel() == 0 or not bool((tolerances > 0).all()):
        raise ValueError(f"thresholds must be a non-empty sequence of positive distances, got {thresholds!r}")

    d_true = pairwise_distances(t)  # [b, n, n]
    d_pred = pairwise_distances(p)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=p.device)
    scored = (d_true < cutoff) & off_diagonal & present[:, :, None] & present[:, None, :]
    preserved = ((d_pred - d_true).abs().unsqueeze(-1) < tolerances).to(dtype).mean(dim=-1)  # [b, n, n]
    total = scored.sum(dim=(-1, -2)).to(dtype)
    score = (preserved * scored).sum(dim=(-1, -2)) / total.clamp_min(1)
    if unbatched:
        score = score[0]
    return to_output(score, wants_numpy("auto", p_numpy and t_numpy), numpy_float_dtype(pred))


def distogram_accuracy(logits, labels, ignore_index: int = -100):
    """Share of labelled pairs whose most likely distogram class is the true one.

    Args:
        logits: (..., K) distogram logits (or probabilities), torch or numpy.
        labels: (...) int class labels, e.g. :func:`get_bucketed_distance_matrix`; ``ignore_index`` is skipped.
        ignore_index: label of pairs left out.

    Returns:
        0-d accuracy over all labelled pairs in [0, 1]; NaN when no pair is labelled.
    """
    scores, was_numpy = as_tensor("logits", logits)
    target, _ = as_tensor("labels", labels)
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"labels must hold integer classes, got {target.dtype}")
    if scores.dim() < 1 or tuple(scores.shape[:-1]) != tuple(target.shape):
        raise ValueError(f"logits must be labels' shape {tuple(target.shape)} plus a class dimension, "
                         f"got {tuple(scores.shape)}")
    check_finite("logits", scores)
    target = target.to(scores.device).long()
    valid = target != ignore_index
    if bool((target[valid] < 0).any()) or bool((target[valid] >= scores.shape[-1]).any()):
        raise ValueError(f"labels must be in [0, {scores.shape[-1]}) or ignore_index={ignore_index}")
    correct = (scores.argmax(dim=-1) == target) & valid
    count = valid.sum()
    accuracy = torch.where(count > 0, correct.sum().double() / count.clamp_min(1),
                           torch.tensor(float("nan"), dtype=torch.float64, device=scores.device))
    return to_output(accuracy, was_numpy)
