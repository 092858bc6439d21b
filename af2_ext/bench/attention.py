"""Block-sparse attention benchmark: ``python -m af2_ext.bench attention [--quick|--full] ...``.

For each configuration (B, H, N, D, block size, BigBird layout near a target density) it times the forward and
the forward+backward of

- ``ours``: :func:`af2_ext.ops.block_sparse_attention` with ``impl="kernel"`` (never the reference fallback);
- ``sdpa``: dense ``torch.nn.functional.scaled_dot_product_attention`` without a mask, the dense baseline.
  It does not depend on the layout, so it is measured once per (B, H, N, D) and repeated on each row;
- ``flex``: ``torch.nn.attention.flex_attention`` compiled with ``torch.compile(dynamic=False)``, given a
  ``BlockMask`` holding exactly the layout's blocks (all of them "full" blocks, so no mask_mod runs);
- ``reference``: :func:`af2_ext.reference.block_sparse_attention_ref` (dense fp32 mask), only for N <= 2048.

An implementation that fails (FlexAttention has no CPU backward, for one) is skipped with the reason recorded.
Times are medians after warmup; throughput counts the blocks each implementation computes (see
:func:`flops`); peak memory is one forward+backward (CUDA: ``max_memory_allocated``; CPU: resident-set
increase in a fresh child process, only with ``--memory`` or ``--full``).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from af2_ext import layouts, ops, reference
from af2_ext.bench import common

IMPLS = ("ours", "sdpa", "flex", "reference")
MODES = ("fwd", "fwd_bwd")
REFERENCE_MAX_N = 2048  # the reference materialises (B, H, N, N) fp32 logits, probabilities and their grads

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def flops(B: int, H: int, Nq: int, Nk: int, D: int, density: float, mode: str) -> float:
    """Floating-point operations of attention on the computed fraction ``density`` of the (Nq, Nk) blocks.

    The flash-attention benchmark convention (``benchmarks/benchmark_flash_attention.py``):

    - ``"fwd"``: two matmuls, Q K^T and P V, of 2 * Nq * Nk * D each: ``4 * B * H * Nq * Nk * D * density``;
    - ``"bwd"``: 2.5x the forward (five matmuls: S recomputed, dV, dP, dQ, dK);
    - ``"fwd_bwd"``: forward + backward, 3.5x the forward.

    Softmax, scaling and masking are not counted.
    """
    forward = 4.0 * B * H * Nq * Nk * D * density
    factors = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
    if mode not in factors:
        raise ValueError(f"mode must be one of {tuple(factors)}, got {mode!r}")
    return forward * factors[mode]


# ----------------------------------------------------------------------------------------------------------
# Configurations and layouts
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """One benchmark row: self-attention, q, k, v of shape (B, H, N, D)."""

    N: int
    D: int
    block_size: int
    target_density: float
    B: int = 1
    H: int = 8


# The target configuration of the issue (B=1, H=8, N=1024, D=32, BigBird ~25%, blocks 64 and 32), and the
# dense layout at block 64 for the kernel's speed against SDPA on equal work.
QUICK = (AttentionConfig(1024, 32, 64, 0.25), AttentionConfig(1024, 32, 32, 0.25), AttentionConfig(1024, 32, 64, 1.0))
FULL = tuple(AttentionConfig(N, D, bs, density)
             for N, D, bs, density in itertools.product((512, 1024, 2048, 4096), (32, 64), (16, 32, 64),
                                                        (0.10, 0.25, 0.50, 1.00)))

# (name, block size, speedup key, threshold), all on B=1, H=8, N=1024, D=32, fp32, BigBird ~25%.
TARGETS = (
    ("forward vs dense SDPA, block 64", 64, "fwd_vs_sdpa", 3.0),
    ("forward vs dense SDPA, block 32", 32, "fwd_vs_sdpa", 2.0),
    ("fwd+bwd vs dense SDPA, block 64", 64, "fwd_bwd_vs_sdpa", 2.0),
    ("forward vs compiled FlexAttention, block 64", 64, "fwd_vs_flex", 3.0),
)
TARGET_SHAPE = {"B": 1, "H": 8, "N": 1024, "D": 32, "target_density": 0.25, "dtype": "float32"}


@functools.lru_cache(maxsize=None)
def bigbird_params(num_blocks: int, target: float, seed: int = 0) -> tuple:
    """BigBird ``(window, num_global, num_random)`` whose layout on ``num_blocks`` blocks is nearest ``target``.

    A small search: num_global in 0..2, every odd window until the band alone overshoots, and for each a
    bisection on num_random (density grows with it: the same seed ranks the free blocks the same way).
    Ties within 0.01 go to layouts with all three BigBird parts.
    """

    def density(window: int, num_global: int, num_random: int) -> float:
        return layouts.density(layouts.bigbird(num_blocks, window=window, num_global=num_global,
                                               num_random=num_random, seed=seed))

    best, best_key = (1, 0, 0), float("inf")
    for num_global in range(min(2, num_blocks) + 1):
        for window in range(1, 2 * num_blocks, 2):
            if density(window, num_global, 0) > target + 0.5 / num_blocks:
                break
            lo, hi = 0, num_blocks  # smallest num_random reaching target, then compare it with one less
            while lo < hi:
                mid = (lo + hi) // 2
                if density(window, num_global, mid) >= target:
                    hi = mid
                else:
                    lo = mid + 1
            for num_random in {max(lo - 1, 0), lo}:
                error = abs(density(window, num_global, num_random) - target)
                missing = (window < 3) + (num_global < 1) + (num_random < 1)
                key = error + 0.01 * missing
                if key < best_key - 1e-12:
                    best, best_key = (window, num_global, num_random), key
    return best


def make_layout(config: AttentionConfig, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The (H, nb, nb) layout of a configuration and its description; target 1.0 is the dense layout."""
    nb = layouts.num_blocks(config.N, config.block_size)
    if config.target_density >= 1.0:
        return layouts.dense(nb, num_heads=config.H), {"kind": "dense"}
    window, num_global, num_random = bigbird_params(nb, config.target_density, seed)
    layout = layouts.bigbird(nb, window=window, num_global=num_global, num_random=num_random, num_heads=config.H,
                             seed=seed)
    return layout, {"kind": "bigbird", "window": window, "num_global": num_global, "num_random": num_random,
                    "seed": seed}


# ----------------------------------------------------------------------------------------------------------
# Implementations: each builder returns forward(q, k, v) -> out, or raises if it cannot run here
# ----------------------------------------------------------------------------------------------------------


def _ours(layout: torch.Tensor, block_size: int) -> Forward:
    return lambda q, k, v: ops.block_sparse_attention(q, k, v, layout, block_size=block_size, impl="kernel")


def _sdpa(layout: torch.Tensor, block_size: int) -> Forward:
    return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _reference(layout: torch.Tensor, block_size: int) -> Forward:
    return lambda q, k, v: reference.block_sparse_attention_ref(q, k, v, layout, block_size=block_size)


def flex_block_mask(layout: torch.Tensor, block_size: int, seq_len_q: int, seq_len_k: int):
    """A FlexAttention ``BlockMask`` computing exactly ``layout``'s blocks, every one of them a full block."""
    from torch.nn.attention.flex_attention import BlockMask

    count = layout.sum(-1, dtype=torch.int32)  # [Hl, nqb]
    # A stable sort of "not computed" lists the computed key blocks first, ascending.
    index = torch.sort((~layout).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)  # [Hl, nqb, nkb]
    return BlockMask.from_kv_blocks(torch.zeros_like(count)[None], index[None], count[None], index[None],
                                    BLOCK_SIZE=block_size, seq_lengths=(seq_len_q, seq_len_k))


def _flex(layout: torch.Tensor, block_size: int) -> Forward:
    from torch.nn.attention.flex_attention import flex_attention

    nqb, nkb = layout.shape[1:]
    block_mask = flex_block_mask(layout, block_size, nqb * block_size, nkb * block_size)
    torch._dynamo.reset()  # a fresh, static compile per configuration (no automatic-dynamic recompiles)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


BUILDERS = {"ours": _ours, "sdpa": _sdpa, "flex": _flex, "reference": _reference}


def _inputs(config: AttentionConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (config.B, config.H, config.N, config.D)
    q, k, v, grad_out = (torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(4))
    return q, k, v, grad_out


def _fwd_bwd_step(forward: Forward, q, k, v, grad_out) -> Callable[[], object]:
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def step():
        out = forward(qg, kg, vg)
        return torch.autograd.grad(out, (qg, kg, vg), grad_out)

    return step



# ----------------------------------------------------------------------------------------------------------
# Peak memory on CPU: one forward+backward in a fresh child process
# ----------------------------------------------------------------------------------------------------------

_CHILD = "from af2_ext.bench.attention import _memory_child_main; _memory_child_main()"


def _memory_child_main() -> None:
    payload = json.loads(sys.stdin.read())
    torch.set_num_threads(payload["threads"])
    config = AttentionConfig(**payload["config"])
    device, dtype = torch.device(payload["device"]), common.DTYPES[payload["dtype"]]
    layout, _ = make_layout(config, payload["seed"])
    forward = BUILDERS[payload["impl"]](layout.to(device), config.block_size)
    step = _fwd_bwd_step(forward, *_inputs(config, device, dtype, payload["seed"]))
    print(json.dumps(common.child_peak_rss_mib(step, warmup=step)))


def _peak_mib(impl: str, step: Callable[[], object], config: AttentionConfig, device: torch.device, dtype: str,
              threads: int, seed: int) -> dict:
    if device.type == "cuda":
        return {"peak_mib": common.cuda_peak_mib(step, device), "method": "torch.cuda.max_memory_allocated"}
    payload = {"config": dataclasses.asdict(config), "impl": impl, "device": device.type, "dtype": dtype,
               "threads": threads, "seed": seed}
    return common.run_child(_CHILD, payload, threads=threads)


# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------


def _empty_result() -> dict:
    return {"fwd_ms": None, "fwd_bwd_ms": None, "fwd_gflops": None, "fwd_bwd_gflops": None,
            "computed_density": None, "peak_mib": None, "peak_method": None, "max_abs_diff_vs_ours": None,
            "notes": []}


def _measure(impl: str, config: AttentionConfig, layout: torch.Tensor, computed_density: float,
             inputs: tuple, device: torch.device, dtype: str, *, warmup: int, reps: int, budget_s: float,
             memory: bool, threads: int, seed: int) -> tuple[dict, Optional[torch.Tensor]]:
    """Times one implementation on one configuration; returns its result and its forward output."""
    result = _empty_result()
    result["computed_density"] = computed_density
    q, k, v, grad_out = inputs
    try:
        forward = BUILDERS[impl](layout, config.block_size)
        out = forward(q, k, v)  # the first call also compiles (flex), outside the timing
        result["fwd_ms"] = common.time_ms(lambda: forward(q, k, v), device, warmup=warmup, reps=reps,
                                          budget_s=budget_s)
    except Exception as error:  # noqa: BLE001  any failure is a recorded skip, never the end of the run
        result["notes"].append(f"fwd skipped: {common.reason(error)}")
        return result, None
    try:
        step = _fwd_bwd_step(forward, q, k, v, grad_out)
        step()
        result["fwd_bwd_ms"] = common.time_ms(step, device, warmup=warmup, reps=reps, budget_s=budget_s)
    except Exception as error:  # noqa: BLE001
        result["notes"].append(f"fwd+bwd skipped: {common.reason(error)}")
        step = None
    for mode in MODES:
        ms = result[f"{mode}_ms"]
        if ms is not None:
            work = flops(config.B, config.H, config.N, config.N, config.D, computed_density, mode)
            result[f"{mode}_gflops"] = work / (ms * 1e-3) / 1e9
    if memory and step is not None:
        try:
            measured = _peak_mib(impl, step, config, device, dtype, threads, seed)
            result["peak_mib"] = measured["peak_mib"]
            result["peak_method"] = measured["method"]
        except Exception as error:  # noqa: BLE001
            result["notes"].append(f"memory skipped: {common.reason(error)}")
    return result, out.detach().float()


def _speedup(slow: Optional[float], fast: Optional[float]) -> Optional[float]:
    return None if slow is None or fast is None or fast <= 0 else slow / fast


def run_attention(configs: Optional[Sequence[AttentionConfig]] = None, *, device: str = "cpu",
                  dtype: str = "float32", reps: int = 10, warmup: int = 2, budget_s: float = 2.0,
                  threads: Optional[int] = None, memory: bool = False, impls: Sequence[str] = IMPLS,
                  seed: int = 0, show_progress: bool = True) -> list[dict]:
    """Benchmark ``configs`` (default :data:`QUICK`) and return one record per configuration.

    Args:
        configs: the rows to run.
        device: "cpu" or "cuda".
        dtype: "float32", "float16" or "bfloat16" (q, k, v; the reference computes in fp32).
        reps, warmup, budget_s: see :func:`af2_ext.bench.common.time_ms`.
        threads: ``torch.set_num_threads`` for the run; None keeps the current setting.
        memory: also measure each implementation's peak memory for one forward+backward.
        impls: a subset of :data:`IMPLS`.
        seed: seed of the layouts' random blocks and of the inputs.
        show_progress: progress on stderr.

    Returns:
        Records ``{"config", "layout", "density", "flops", "results": {impl: {...}}, "speedup"}``; times in
        ms, throughput in GFLOP/s, memory in MiB, None where not measured (the impl's ``notes`` say why).
    """
    configs = list(QUICK if configs is None else configs)
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise ValueError(f"impls must be a subset of {IMPLS}, got {sorted(unknown)}")
    if dtype not in common.DTYPES:
        raise ValueError(f"dtype must be one of {tuple(common.DTYPES)}, got {dtype!r}")
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    timing = dict(warmup=warmup, reps=reps, budget_s=budget_s, memory=memory, threads=threads, seed=seed)

    records = []
    sdpa_cache: dict = {}
    items = common.progress(configs, lambda c: f"N={c.N} D={c.D} bs={c.block_size} ~{c.target_density:.0%}") \
        if show_progress else configs
    for config in items:
        layout, layout_info = make_layout(config, seed)
        density = layouts.density(layout)
        layout = layout.to(torch_device)
        inputs = _inputs(config, torch_device, common.DTYPES[dtype], seed)
        results, outputs = {}, {}
        for impl in impls:
            if impl == "reference" and config.N > REFERENCE_MAX_N:
                results[impl] = _empty_result()
                results[impl]["notes"].append(f"skipped: N > {REFERENCE_MAX_N} (dense N x N memory and time)")
                continue
            impl_density = 1.0 if impl in ("sdpa", "reference") else density  # what each one computes
            if impl == "sdpa":
                key = (config.B, config.H, config.N, config.D)
                if key not in sdpa_cache:
                    sdpa_cache[key] = _measure(impl, config, layout, impl_density, inputs, torch_device, dtype,
                                               **timing)
                result, outputs[impl] = sdpa_cache[key]
                result = json.loads(json.dumps(result))  # an independent copy per row
            else:
                result, outputs[impl] = _measure(impl, config, layout, impl_density, inputs, torch_device, dtype,
                                                 **timing)
            results[impl] = result
        ours = outputs.get("ours")
        for impl, out in outputs.items():
            comparable = impl != "sdpa" or layout_info["kind"] == "dense"  # SDPA ignores the layout
            if impl != "ours" and ours is not None and out is not None and comparable:
                diff = (out - ours).abs().max().item()
                if math.isfinite(diff):
                    results[impl]["max_abs_diff_vs_ours"] = diff
                else:
                    results[impl]["notes"].append("output differs from ours by a non-finite amount")
        speedup = {}
        for base in ("sdpa", "flex"):
            for mode in MODES:
                speedup[f"{mode}_vs_{base}"] = _speedup(results.get(base, {}).get(f"{mode}_ms"),
                                                        results.get("ours", {}).get(f"{mode}_ms"))
        records.append({
            "config": {**dataclasses.asdict(config), "dtype": dtype, "device": torch_device.type},
            "layout": layout_info,
            "density": density,
            "flops": {mode: flops(config.B, config.H, config.N, config.N, config.D, density, mode)
                      for mode in MODES},
            "results": results,
            "speedup": speedup,
        })
    return records


def evaluate_targets(records: Sequence[dict]) -> list[dict]:
    """The issue's speedup targets, PASS/MISS from the matching records; "n/a" where not measured."""
    out = []
    for name, block_size, key, threshold in TARGETS:
        match = [r for r in records if r["config"]["block_size"] == block_size
                 and r["layout"]["kind"] == "bigbird"
                 and all(r["config"][field] == value for field, value in TARGET_SHAPE.items())]
        value, why = None, "target configuration not in this run"
        if match:
            value = match[0]["speedup"][key]
            base = "flex" if key.endswith("flex") else "sdpa"
            notes = match[0]["results"].get(base, {}).get("notes", []) + \
                match[0]["results"].get("ours", {}).get("notes", [])
            why = "; ".join(notes) or "not measured"
        status = "n/a" if value is None else "PASS" if value >= threshold else "MISS"
        out.append({"name": name, "block_size": block_size, "metric": key, "threshold": threshold, "value": value,
                    "status": status, "note": None if value is not None else why})
    return out


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def format_records(records: Sequence[dict]) -> str:
    """The table (times in ms), then each distinct skip reason once."""
    ms = lambda r, impl, mode: r["results"].get(impl, {}).get(f"{mode}_ms")  # noqa: E731
    header = ["N", "D", "bs", "density",
              "ours fwd", "sdpa fwd", "flex fwd", "ref fwd", "ours f+b", "sdpa f+b", "flex f+b", "ref f+b",
              "x sdpa fwd", "x sdpa f+b", "x flex fwd", "x flex f+b", "GFLOP/s fwd", "GFLOP/s f+b"]
    with_memory = any(res.get("peak_mib") is not None for r in records for res in r["results"].values())
    if with_memory:
        header += [f"{impl} MiB" for impl in ("ours", "sdpa", "flex", "ref")]
    rows = []
    for r in records:
        c, s, ours = r["config"], r["speedup"], r["results"].get("ours", {})
        row = [c["N"], c["D"], c["block_size"], f"{r['density']:.3f}"]
        row += [common.fmt(ms(r, impl, mode)) for mode in MODES for impl in IMPLS]
        row += [common.fmt(s[key], ".2f") + ("x" if s[key] is not None else "")
                for key in ("fwd_vs_sdpa", "fwd_bwd_vs_sdpa", "fwd_vs_flex", "fwd_bwd_vs_flex")]
        row += [common.fmt(ours.get("fwd_gflops"), ".1f"), common.fmt(ours.get("fwd_bwd_gflops"), ".1f")]
        if with_memory:
            row += [common.fmt(r["results"].get(impl, {}).get("peak_mib"), ".1f") for impl in IMPLS]
        rows.append(row)
    return "\n".join([common.format_table(header, rows)] + common.note_lines(records))


def format_targets(targets: Sequence[dict]) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in TARGET_SHAPE.items() if k != "target_density")
    rows = [dict(t, value=None if t["value"] is None else f"{t['value']:.2f}x",
                 threshold_text=f"target >= {t['threshold']:.0f}x") for t in targets]
    return common.format_targets(f"targets ({shape}, BigBird ~25% density):", rows, value_spec="")


def plot(records: Sequence[dict], path: str) -> bool:
    """Speedup of ours over SDPA vs density, one line per (N, D, block), forward and fwd+bwd side by side.
    Returns False (and writes nothing) when matplotlib is not installed."""
    plt = common.pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    series: dict = {}
    for r in records:
        c = r["config"]
        series.setdefault((c["N"], c["D"], c["block_size"]), []).append(r)
    for ax, mode in zip(axes, MODES):
        for (N, D, bs), rows in sorted(series.items()):
            points = sorted((r["density"], r["speedup"][f"{mode}_vs_sdpa"]) for r in rows
                            if r["speedup"][f"{mode}_vs_sdpa"] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=f"N={N} D={D} bs={bs}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("layout density")
        ax.set_title(f"{'forward' if mode == 'fwd' else 'forward+backward'}: ours vs dense SDPA")
    axes[0].set_ylabel("speedup (x)")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    common.save_figure_atomic(fig, path)
    plt.close(fig)
    return True


def report(records: Sequence[dict], settings: dict, environment: dict) -> dict:
    """The JSON document: environment, settings, records and targets."""
    return {"benchmark": "attention", "environment": environment, "settings": settings,
            "records": list(records), "targets": evaluate_targets(records)}


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="grid", action="store_const", const="quick",
                      help="the target configuration (N=1024, D=32, BigBird ~25%%, blocks 64 and 32) and its "
                           "dense layout (default; well under a minute on 2 CPU cores)")
    size.add_argument("--full", dest="grid", action="store_const", const="full",
                      help="N in {512..4096} x D in {32, 64} x blocks {16, 32, 64} x densities "
                           "{10, 25, 50, 100}%%, with peak memory (long)")
    parser.set_defaults(grid="quick")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=tuple(common.DTYPES), default="float32")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="results file (default bench_results/attention-<device>.json)")
    parser.add_argument("--plot", metavar="PATH", default=None, help="speedup plot (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak memory of one forward+backward (always on with --full)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions, at most (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2; 3 with --full)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), metavar="IMPL",
                        help=f"implementations to run, any of {' '.join(IMPLS)} (default all; without flex no "
                             "torch.compile runs, which takes the longest on a fresh machine)")


def main(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    full = args.grid == "full"
    settings = {
        "grid": args.grid, "device": device, "dtype": args.dtype,
        "reps": args.reps if args.reps is not None else 20,
        "warmup": args.warmup if args.warmup is not None else (3 if full else 2),
        "budget_s": 3.0 if full else 2.0,
        "memory": bool(args.memory or full),
        "impls": [impl for impl in IMPLS if impl in args.impls],
    }
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings["threads"] = torch.get_num_threads()
    env = common.environment(torch.device(device))
    print(f"af2_ext attention benchmark: {env['device_name']} ({device}, cpu_isa={env['cpu_isa']}, "
          f"threads={env['threads']}), torch {env['torch']}, {args.dtype}, B=1 H=8, {args.grid} grid, "
          f"{' '.join(settings['impls'])}", flush=True)

    started = time.perf_counter()
    records = run_attention(FULL if full else QUICK, device=device, dtype=args.dtype, reps=settings["reps"],
                            warmup=settings["warmup"], budget_s=settings["budget_s"], memory=settings["memory"],
                            impls=settings["impls"])
    settings["wall_s"] = round(time.perf_counter() - started, 1)
    doc = report(records, settings, env)

    print("times: median ms; x = ours' speedup; GFLOP/s: ours on computed blocks (fwd+bwd = 3.5x fwd flops)")
    print(format_records(records))
    print()
    print(format_targets(doc["targets"]))

    path = args.json or os.path.join("bench_results", f"attention-{device}.json")
    common.write_json_atomic(path, doc)
    print(f"\nwrote {path} ({settings['wall_s']:.0f} s)")
    if args.plot:
        common.say_plot(args.plot, plot(records, args.plot))
    return 0
