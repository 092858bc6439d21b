"""Figures of the application: the distogram and contact maps of a fold (``af2-ext fold``) and the loss curve of a
training run (``af2-ext train``). matplotlib's object API only (no pyplot: no global backend state; renders with
Agg), each figure written atomically (:func:`af2_ext.fileio.save_figure_atomic`).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from af2_ext.fileio import PathLike, save_figure_atomic
from af2_ext.residue_constants import CONTACT_THRESHOLD, DISTANCE_THRESHOLDS

__all__ = ["plot_distogram", "plot_contacts", "plot_loss_curve"]


def _figure(panels: int, size: tuple = (5.2, 4.4)):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the plots need matplotlib: pip install matplotlib") from error
    fig = Figure(figsize=(size[0] * panels, size[1]))
    return fig, [fig.add_subplot(1, panels, k + 1) for k in range(panels)]


def _draw_maps(path: PathLike, title: str, maps: Sequence[tuple[str, np.ndarray]], label: str, cmap: str,
               vmin: float, vmax: float) -> str:
    fig, axes = _figure(len(maps))
    for ax, (panel_title, values) in zip(axes, maps):
        image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", origin="upper")
        ax.set_title(panel_title)
        ax.set_xlabel("residue j")
        ax.set_ylabel("residue i")
        fig.colorbar(image, ax=ax, label=label, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return os.fspath(path)


def _square(name: str, value, n: int) -> np.ndarray:
    array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    if array.shape != (n, n):
        raise ValueError(f"{name} must be ({n}, {n}), got {array.shape}")
    return array



def plot_distogram(result, path: PathLike, true_distances=None) -> str:
    """PNG of the predicted expected Cα distances of a :class:`~af2_ext.app.fold.FoldResult`, beside
    ``true_distances`` (n, n) when given (NaN = unknown)."""
    n = len(result.sequence)
    maps = [("predicted (expected distance)", result.distances.double().numpy())]
    if true_distances is not None:
        maps.append(("true Cα distances", _square("true_distances", true_distances, n)))
    vmax = float(DISTANCE_THRESHOLDS[-1])
    return _draw_maps(path, f"{result.name}: distogram", maps, "Å", "viridis_r", 0.0, vmax)


def plot_contacts(result, path: PathLike, true_contacts=None, threshold: float = CONTACT_THRESHOLD) -> str:
    """PNG of the predicted contact probability P(d <= threshold) of a :class:`~af2_ext.app.fold.FoldResult`,
    beside the true (n, n) contact map."""
    n = len(result.sequence)
    maps = [(f"predicted P(d <= {threshold:g} Å)", result.contact_probabilities(threshold).double().numpy())]
    if true_contacts is not None:
        maps.append((f"true contacts (d <= {threshold:g} Å)", _square("true_contacts", true_contacts, n)))
    return _draw_maps(path, f"{result.name}: contacts", maps, "probability", "Greys", 0.0, 1.0)


def plot_loss_curve(rows: Sequence[dict], path: PathLike) -> str:
    """PNG of a training run's loss: the ``kind == "train"`` rows' ``loss`` and the ``kind == "eval"`` rows'
    ``val_loss`` (``metrics.jsonl``) against the optimiser step."""
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, (ax,) = _figure(1, (6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("distogram cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return os.fspath(path)
