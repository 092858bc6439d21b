"""Reversible trunk benchmark: ``python -m af2_ext.bench reversible [--quick] [--depths ...] ...``.

A stack of the trunk's layers (:func:`af2_ext.blocks.trunk_couplings`: pair self-attention, MSA row attention,
cross-attention both ways, feed-forwards; pair and MSA streams) at depths 1-24, one training step (forward and
backward of every parameter and input) timed three ways:

- ``reversible``: :class:`af2_ext.reversible.ReversibleCouplings` (outputs stored, inputs rebuilt in backward);
- ``sequential``: :class:`af2_ext.reversible.SequentialCouplings` (ordinary autograd, every activation stored);
- ``checkpoint``: the sequential layers, each under ``torch.utils.checkpoint`` (reentrant: a layer keeps its
  inputs and recomputes its activations in backward).

Activation memory is measured deterministically as the bytes of the tensors autograd saves for the backward
(``torch.autograd.graph.saved_tensors_hooks``, distinct storages); on CUDA also the peak
``max_memory_allocated`` of the step above what was allocated before it. Reconstruction drift: the inputs
rebuilt from the outputs of the deepest stack (eval mode) vs the true inputs, in fp32 and bf16.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from af2_ext.bench import common
from af2_ext.blocks import trunk_couplings
from af2_ext.reversible import ReversibleCouplings, SequentialCouplings

MODES = ("reversible", "sequential", "checkpoint")
DEPTHS = (1, 2, 4, 8, 12, 24)
QUICK_DEPTHS = (1, 12)  # the two depths the targets compare


@dataclasses.dataclass(frozen=True)
class TrunkConfig:
    """A seed-like trunk small enough for a CPU: pair n x n tokens, MSA of M rows of n."""

    n: int = 32
    M: int = 5
    dim: int = 64
    heads: int = 4
    dim_head: int = 32
    ratio: int = 2
    dropout: float = 0.1
    B: int = 1


class CheckpointSequence(nn.Module):
    """The sequential layers, each under reentrant ``torch.utils.checkpoint``."""

    def __init__(self, layers: Sequence[Sequence[nn.Module]], num_halves: int):
        super().__init__()
        self.layers = nn.ModuleList(SequentialCouplings([layer], num_halves) for layer in layers)

    def forward(self, *halves, **context):
        for layer in self.layers:
            halves = checkpoint(lambda *h, layer=layer: layer(*h, **context), *halves, use_reentrant=True)
        return halves


def build(mode: str, config: TrunkConfig, depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [trunk_couplings(config.dim, heads=config.heads, dim_head=config.dim_head, dropout=config.dropout,
                              ratio=config.ratio, block_size=32) for _ in range(depth)]
    if mode == "reversible":
        return ReversibleCouplings(layers, 4)
    if mode == "sequential":
        return SequentialCouplings(layers, 4)
    if mode == "checkpoint":
        return CheckpointSequence(layers, 4)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def inputs(config: TrunkConfig, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The halves (x1, x2, m1, m2) requiring grad and the context (masks, MSA shape)."""
    generator = torch.Generator().manual_seed(seed)
    pair, msa = config.n * config.n, config.M * config.n
    halves = [torch.randn(config.B, size, config.dim, generator=generator).to(device=device, dtype=dtype)
              .requires_grad_() for size in (pair, pair, msa, msa)]
    mask = torch.ones(config.B, pair, dtype=torch.bool, device=device)
    msa_mask = torch.ones(config.B, msa, dtype=torch.bool, device=device)
    mask[:, -config.n:] = False  # a padded last row of the pair, like a shorter protein
    return halves, dict(mask=mask, msa_mask=msa_mask, msa_shape=(config.M, config.n))


def train_step(model: nn.Module, halves, context) -> None:
    """Forward and backward into ``.grad`` (reentrant checkpointing does not support ``autograd.grad``)."""
    model.zero_grad(set_to_none=True)
    for h in halves:
        h.grad = None
    out = model(*halves, **context)
    sum(o.float().square().mean() for o in out if o is not None).backward()


def saved_mib(model: nn.Module, halves, context) -> float:
    """MiB of the distinct storages autograd saves in one forward."""
    storages: dict = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*halves, **context)
    del out
    return sum(storages.values()) / 2**20


def drift(config: TrunkConfig, depth: int, device: torch.device, dtype: torch.dtype) -> float:
    """Relative max error of the inputs rebuilt through ``depth`` layers (eval mode, no dropout)."""
    model = build("reversible", config, depth).to(device=device, dtype=dtype).eval()
    halves, context = inputs(config, device, dtype)
    halves = [h.detach() for h in halves]
    with torch.no_grad():
        rebuilt = model.inverse(*model(*halves, **context), **context)
    return max(((r.float() - h.float()).abs().max() / h.float().abs().max()).item() for r, h in zip(rebuilt, halves))


def run_reversible(config: TrunkConfig = TrunkConfig(), depths: Sequence[int] = DEPTHS, *, device: str = "cpu",
                   reps: int = 5, warmup: int = 1, budget_s: float = 20.0, threads: Optional[int] = None,
                   show_progress: bool = True) -> list[dict]:
    """One record per (depth, mode): step ms, saved MiB, CUDA peak MiB (None on CPU)."""
    torch_device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    jobs = [(depth, mode) for depth in depths for mode in MODES]
    items = common.progress(jobs, lambda j: f"depth={j[0]} {j[1]}") if show_progress else jobs
    records = []
    for depth, mode in items:
        model = build(mode, config, depth).to(torch_device)
        halves, context = inputs(config, torch_device)
        record = {"depth": depth, "mode": mode, "step_ms": None, "saved_mib": None, "cuda_peak_mib": None, "notes": []}
        try:
            record["saved_mib"] = saved_mib(model, halves, context)
            record["step_ms"] = common.time_ms(lambda: train_step(model, halves, context), torch_device,
                                               warmup=warmup, reps=reps, budget_s=budget_s)
            if torch_device.type == "cuda":
                record["cuda_peak_mib"] = common.cuda_peak_mib(lambda: train_step(model, halves, context), torch_device)
        except Exception as error:  # noqa: BLE001  recorded, never the end of the run
            record["notes"].append(common.reason(error))
        records.append(record)
    return records


def _get(records, depth, mode, field):
    for r in records:
        if r["depth"] == depth and r["mode"] == mode:
            return r[field]
    return None


def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def evaluate_targets(records: Sequence[dict]) -> list[dict]:
    """Memory flat from depth 1 to 12 (<= 1.25x), reversible step <= 1.4x sequential (depth 12), reversible
    faster than checkpointing (depth 12) with no more memory."""
    mem = _ratio(_get(records, 12, "reversible", "saved_mib"), _get(records, 1, "reversible", "saved_mib"))
    overhead = _ratio(_get(records, 12, "reversible", "step_ms"), _get(records, 12, "sequential", "step_ms"))
    vs_ckpt = _ratio(_get(records, 12, "checkpoint", "step_ms"), _get(records, 12, "reversible", "step_ms"))
    mem_vs_ckpt = _ratio(_get(records, 12, "reversible", "saved_mib"), _get(records, 12, "checkpoint", "saved_mib"))

    def verdict(value, ok):
        return "n/a" if value is None else "PASS" if ok(value) else "MISS"

    both = None if vs_ckpt is None or mem_vs_ckpt is None else (vs_ckpt, mem_vs_ckpt)
    return [
        {"name": "reversible saved memory, depth 12 / depth 1 (<= 1.25x)", "value": mem,
         "status": verdict(mem, lambda v: v <= 1.25)},
        {"name": "reversible step time / sequential, depth 12 (<= 1.4x)", "value": overhead,
         "status": verdict(overhead, lambda v: v <= 1.4)},
        {"name": "checkpoint step time / reversible, depth 12 (> 1x)", "value": vs_ckpt,
         "status": verdict(both, lambda v: v[0] > 1.0 and v[1] <= 1.0),
         "note": None if mem_vs_ckpt is None else f"reversible saves {mem_vs_ckpt:.2f}x checkpoint's bytes"},
    ]


def format_records(records: Sequence[dict], depths: Sequence[int]) -> str:
    header = ["depth"] + [f"{m} ms" for m in MODES] + [f"{m} MiB" for m in MODES]
    cuda = any(r["cuda_peak_mib"] is not None for r in records)
    if cuda:
        header += [f"{m} peak" for m in MODES]
    header += ["rev/seq time", "ckpt/rev time"]
    rows = []
    for d in depths:
        row = [d] + [common.fmt(_get(records, d, m, "step_ms"), ".1f") for m in MODES]
        row += [common.fmt(_get(records, d, m, "saved_mib"), ".2f") for m in MODES]
        if cuda:
            row += [common.fmt(_get(records, d, m, "cuda_peak_mib"), ".1f") for m in MODES]
        row += [common.fmt(_ratio(_get(records, d, "reversible", "step_ms"), _get(records, d, "sequential", "step_ms")),
                           ".2f"),
                common.fmt(_ratio(_get(records, d, "checkpoint", "step_ms"), _get(records, d, "reversible", "step_ms")),
                           ".2f")]
        rows.append(row)
    lines = [common.format_table(header, rows)]
    lines += [f"note: depth {r['depth']} {r['mode']}: {n}" for r in records for n in r["notes"]]
    return "\n".join(lines)


def plot(records: Sequence[dict], depths: Sequence[int], path: str) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        for ax, field in zip(axes, ("step_ms", "saved_mib")):
            points = [(d, _get(records, d, mode, field)) for d in depths if _get(records, d, mode, field) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=mode)
    axes[0].set_title("training step (ms)")
    axes[1].set_title("activation memory saved by autograd (MiB)")
    for ax in axes:
        ax.set_xlabel("depth (layers)")
        ax.legend()
    fig.tight_layout()
    common.save_figure_atomic(fig, path)
    plt.close(fig)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="depths 1 and 12 only (the targets' two), 3 timed steps, drift through 12 layers")
    parser.add_argument("--depths", type=int, nargs="+", default=None,
                        help="stack depths (default 1 2 4 8 12 24; 1 12 with --quick)")
    parser.add_argument("--n", type=int, default=TrunkConfig.n, help="residues (pair n*n tokens; default 32)")
    parser.add_argument("--msa", type=int, default=TrunkConfig.M, help="MSA rows (default 5)")
    parser.add_argument("--dim", type=int, default=TrunkConfig.dim, help="model width (default 64)")
    parser.add_argument("--drift-depth", type=int, default=None,
                        help="layers the reconstruction drift is measured through (default 48; 12 with --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--reps", type=int, default=None, help="timed steps, at most (default 5; 3 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="results file (default bench_results/reversible-<device>.json)")
    parser.add_argument("--plot", metavar="PATH", default=None, help="plot (needs matplotlib)")


def main(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    depths = args.depths or list(QUICK_DEPTHS if args.quick else DEPTHS)
    reps = args.reps if args.reps is not None else 3 if args.quick else 5
    deepest = args.drift_depth if args.drift_depth is not None else 12 if args.quick else 48
    bad = [d for d in depths if d < 1]
    if bad:
        raise SystemExit(f"--depths must be positive, got {bad}")
    if deepest < 1:
        raise SystemExit(f"--drift-depth must be positive, got {deepest}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = TrunkConfig(n=args.n, M=args.msa, dim=args.dim)
    depths = sorted(set(depths))
    env = common.environment(torch.device(device))
    print(f"af2_ext reversible trunk benchmark: {env['device_name']} ({device}, threads={env['threads']}), "
          f"torch {env['torch']}, {config}", flush=True)
    started = time.perf_counter()
    records = run_reversible(config, depths, device=device, reps=reps)
    drifts = {name: drift(config, deepest, torch.device(device), dtype)
              for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    wall = round(time.perf_counter() - started, 1)
    targets = evaluate_targets(records)
    print("step: median ms of one forward+backward; MiB: bytes autograd saves for the backward")
    print(format_records(records, depths))
    print(f"\nreconstruction drift through {deepest} layers (relative max error of rebuilt inputs): "
          + ", ".join(f"{k} {v:.2e}" for k, v in drifts.items()))
    print("\ntargets:")
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  {t['name']:<58} {value:>6}  {t['status']}" + (f"  [{t['note']}]" if t.get("note") else ""))
    doc = {"benchmark": "reversible", "environment": env, "settings": {**dataclasses.asdict(config),
           "depths": depths, "reps": reps, "quick": args.quick, "device": device, "wall_s": wall},
           "records": records, "drift": {"depth": deepest, **drifts}, "targets": targets}
    path = args.json or os.path.join("bench_results", f"reversible-{device}.json")
    common.write_json_atomic(path, doc)
    print(f"\nwrote {path} ({wall:.0f} s)")
    if args.plot:
        common.say_plot(args.plot, plot(records, depths, args.plot))
    return 0
