"""Compressed attention benchmark: ``python -m af2_ext.bench compressed_attention [--quick|--full] ...``.

The seed's cross-attention from the pair stream to the MSA: queries are the n*n pair tokens, keys and values
the M*n MSA tokens (H=8, D=64), compressed by the strided grouped convolution with ``ratio`` 1-4. For each
configuration it times the forward and the forward+backward (gradients of q, k, v, weight and bias) of

- ``ours``: :func:`af2_ext.ops.compressed_attention` with ``impl="kernel"`` (fused compression, flash
  attention over the compressed keys; dense, no layout);
- ``reference``: :func:`af2_ext.reference.compressed_attention_ref`, the seed's way (pad, ``conv1d``, the
  Nq x Nk/ratio logits and probabilities materialised), skipped where its estimated memory does not fit.

Peak memory is one forward+backward: on CUDA ``max_memory_allocated`` above what was allocated before; on
CPU the resident-set increase in a fresh child process (VmHWM - VmRSS around the call, after a warmup call),
with the child's whole-process high-water mark (interpreter, torch and inputs included) recorded beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from af2_ext import ops, reference
from af2_ext.bench import common

IMPLS = ("ours", "reference")
MODES = ("fwd", "fwd_bwd")
# Bytes the reference holds per element of one (B, H, Nq, Nc) fp32 matrix during forward+backward: logits,
# masked logits, probabilities and their gradients (measured ~4.1 GiB for a 1 GiB logit matrix).
REFERENCE_BYTES_PER_LOGIT = 4 * 5


@dataclasses.dataclass(frozen=True)
class CompressedAttentionConfig:
    """One row: pair tokens attend to MSA tokens. Nq = n*n, Nk = M*n."""

    n: int
    M: int
    ratio: int
    B: int = 1
    H: int = 8
    D: int = 64

    @property
    def Nq(self) -> int:
        return self.n * self.n

    @property
    def Nk(self) -> int:
        return self.M * self.n

    @property
    def Nc(self) -> int:
        return -(-self.Nk // self.ratio)


# The target shape (Nq = 16384, Nk = 6144, ratio 3: n = 128, M = 48), then the seed's smallest shape at
# every ratio.
TARGET = CompressedAttentionConfig(n=128, M=48, ratio=3)
QUICK = (TARGET,) + tuple(CompressedAttentionConfig(n=64, M=5, ratio=r) for r in (1, 2, 3, 4))
FULL = (TARGET,) + tuple(CompressedAttentionConfig(n=n, M=M, ratio=r)
                         for n in (64, 128, 256) for M in (5, 20, 64) for r in (1, 2, 3, 4))
TARGETS = (
    # (name, metric, device type or None for any, threshold, lower is better)
    ("peak memory ours / reference (<= 0.1)", "peak_ratio", None, 0.1, True),
    ("fwd+bwd speedup vs reference, CPU (>= 2x)", "fwd_bwd_speedup", "cpu", 2.0, False),
    ("fwd+bwd speedup vs reference, CUDA (>= 3x)", "fwd_bwd_speedup", "cuda", 3.0, False),
)


def flops(config: CompressedAttentionConfig, mode: str) -> float:
    """Attention on the compressed keys (the flash-attention convention: 4 * B * H * Nq * Nc * D forward,
    backward 2.5x) plus the compression, 2 * 2 * B * H * Nk * D * D for keys and values (backward 2x)."""
    attention = 4.0 * config.B * config.H * config.Nq * config.Nc * config.D
    compression = 0.0 if config.ratio == 1 else 4.0 * config.B * config.H * config.Nk * config.D * config.D
    if mode == "fwd":
        return attention + compression
    if mode == "fwd_bwd":
        return 3.5 * attention + 3.0 * compression
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def reference_bytes(config: CompressedAttentionConfig) -> int:
    """Rough memory of the reference's forward+backward (see REFERENCE_BYTES_PER_LOGIT)."""
    return REFERENCE_BYTES_PER_LOGIT * config.B * config.H * config.Nq * config.Nc


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


# ----------------------------------------------------------------------------------------------------------
# Inputs and steps
# ----------------------------------------------------------------------------------------------------------


def _inputs(config: CompressedAttentionConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=generator) * scale).to(device=device, dtype=dtype)

    B, H, D, r = config.B, config.H, config.D, config.ratio
    tensors = {"q": randn(B, H, config.Nq, D), "k": randn(B, H, config.Nk, D), "v": randn(B, H, config.Nk, D),
               "grad_out": randn(B, H, config.Nq, D), "weight": None, "bias": None}
    if r > 1:  # the convolution's parameters stay fp32, as in a mixed-precision model
        tensors["weight"] = (torch.randn(H * D, D, r, generator=generator) * (D * r) ** -0.5).to(device)
        tensors["bias"] = (torch.randn(H * D, generator=generator) * 0.1).to(device)
    return tensors


def _forward(impl: str, config: CompressedAttentionConfig) -> Callable:
    if impl == "ours":
        return lambda q, k, v, w, b: ops.compressed_attention(q, k, v, config.ratio, w, b, impl="kernel")
    return lambda q, k, v, w, b: reference.compressed_attention_ref(q, k, v, config.ratio, w, b)


def _steps(impl: str, config: CompressedAttentionConfig, tensors: dict) -> tuple[Callable, Callable]:
    forward = _forward(impl, config)
    names = ("q", "k", "v", "weight", "bias")
    leaves = {n: None if tensors[n] is None else tensors[n].detach().clone().requires_grad_() for n in names}
    args = [leaves[n] for n in names]
    wanted = [t for t in args if t is not None]

    def fwd():
        with torch.no_grad():
            return forward(*args)

    def fwd_bwd():
        out = forward(*args)
        return torch.autograd.grad(out, wanted, tensors["grad_out"])

    return fwd, fwd_bwd



_CHILD = "from af2_ext.bench.compressed_attention import _memory_child_main; _memory_child_main()"


def _memory_child_main() -> None:
    payload = json.loads(sys.stdin.read())
    torch.set_num_threads(payload["threads"])
    config = CompressedAttentionConfig(**payload["config"])
    device = torch.device(payload["device"])
    tensors = _inputs(config, device, common.DTYPES[payload["dtype"]], payload["seed"])
    _, step = _steps(payload["impl"], config, tensors)
    print(json.dumps(common.child_peak_rss_mib(step, warmup=step)))


def _peak(impl: str, step: Callable, config: CompressedAttentionConfig, device: torch.device, dtype: str, threads: int,
          seed: int) -> dict:
    if device.type == "cuda":
        return {"peak_mib": common.cuda_peak_mib(step, device), "process_peak_mib": None,
                "method": "torch.cuda.max_memory_allocated"}
    payload = {"config": dataclasses.asdict(config), "impl": impl, "device": device.type, "dtype": dtype,
               "threads": threads, "seed": seed}
    return common.run_child(_CHILD, payload, threads=threads, timeout_s=1800)


# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------


def _empty_result() -> dict:
    return {"fwd_ms": None, "fwd_bwd_ms": None, "fwd_gflops": None, "fwd_bwd_gflops": None, "peak_mib": None,
            "process_peak_mib": None, "peak_method": None, "max_abs_diff_vs_ours": None, "notes": []}


def _measure(impl: str, config: CompressedAttentionConfig, tensors: dict, device: torch.device, dtype: str, *,
             warmup: int, reps: int, budget_s: float, memory: bool, threads: int,
             seed: int) -> tuple[dict, Optional[torch.Tensor]]:
    result = _empty_result()
    fwd, fwd_bwd = _steps(impl, config, tensors)
    try:
        out = fwd()
        result["fwd_ms"] = common.time_ms(fwd, device, warmup=warmup, reps=reps, budget_s=budget_s)
        fwd_bwd()
        result["fwd_bwd_ms"] = common.time_ms(fwd_bwd, device, warmup=warmup, reps=reps, budget_s=budget_s)
    except Exception as error:  # noqa: BLE001  a failure is a recorded skip, never the end of the run
        result["notes"].append(f"skipped: {common.reason(error)}")
        return result, None
    for mode in MODES:
        result[f"{mode}_gflops"] = flops(config, mode) / (result[f"{mode}_ms"] * 1e-3) / 1e9
    if memory:
        try:
            measured = _peak(impl, fwd_bwd, config, device, dtype, threads, seed)
            result["peak_mib"] = measured["peak_mib"]
            result["process_peak_mib"] = measured.get("process_peak_mib")
            result["peak_method"] = measured["method"]
        except Exception as error:  # noqa: BLE001
            result["notes"].append(f"memory skipped: {common.reason(error)}")
    return result, out.float()


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return None if num is None or den is None or den <= 0 else num / den


def run_compressed_attention(configs: Optional[Sequence[CompressedAttentionConfig]] = None, *, device: str = "cpu",
                             dtype: str = "float32", reps: int = 10, warmup: int = 1, budget_s: float = 3.0,
                             threads: Optional[int] = None, memory: bool = True, memory_fraction: float = 0.6,
                             seed: int = 0, show_progress: bool = True) -> list[dict]:
    """Benchmark ``configs`` (default :data:`QUICK`); one record per configuration.

    Args:
        configs: the rows to run.
        device: "cpu" or "cuda". dtype: of q, k, v ("float32", "float16", "bfloat16").
        reps, warmup, budget_s: see :func:`af2_ext.bench.common.time_ms`.
        threads: ``torch.set_num_threads`` for the run; None keeps the current setting.
        memory: measure each implementation's peak memory of one forward+backward.
        memory_fraction: the reference runs only where its estimated memory is below this fraction of the
            memory available.
        seed: input seed.

    Returns:
        Records ``{"config", "flops", "results": {impl: {...}}, "speedup", "peak_ratio"}``; ms, GFLOP/s, MiB.
    """
    configs = list(QUICK if configs is None else configs)
    if dtype not in common.DTYPES:
        raise ValueError(f"dtype must be one of {tuple(common.DTYPES)}, got {dtype!r}")
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    if threads is not None:
        torch.set_num_threads(threads)
    timing = dict(warmup=warmup, reps=reps, budget_s=budget_s, memory=memory, threads=torch.get_num_threads(),
                  seed=seed)
    records = []
    items = common.progress(configs, lambda c: f"n={c.n} M={c.M} ratio={c.ratio}") if show_progress else configs
    for config in items:
        tensors = _inputs(config, torch_device, common.DTYPES[dtype], seed)
        results, outputs = {}, {}
        for impl in IMPLS:
            if impl == "reference":
                need, have = reference_bytes(config), available_bytes(torch_device)
                if need > memory_fraction * have:
                    results[impl] = _empty_result()
                    results[impl]["notes"].append(
                        f"skipped: needs ~{need / 2**30:.0f} GiB for its Nq x Nc matrices, {have / 2**30:.0f} GiB "
                        "available")
                    continue
            results[impl], outputs[impl] = _measure(impl, config, tensors, torch_device, dtype, **timing)
        if outputs.get("ours") is not None and outputs.get("reference") is not None:
            diff = (outputs["reference"] - outputs["ours"]).abs().max().item()
            results["reference"]["max_abs_diff_vs_ours"] = diff if math.isfinite(diff) else None
        ours, ref = results["ours"], results.get("reference", _empty_result())
        records.append({
            "config": {**dataclasses.asdict(config), "Nq": config.Nq, "Nk": config.Nk, "Nc": config.Nc,
                       "dtype": dtype, "device": torch_device.type},
            "flops": {mode: flops(config, mode) for mode in MODES},
            "results": results,
            "speedup": {f"{mode}_speedup": _ratio(ref[f"{mode}_ms"], ours[f"{mode}_ms"]) for mode in MODES},
            "peak_ratio": _ratio(ours["peak_mib"], ref["peak_mib"]),
            "process_peak_ratio": _ratio(ours["process_peak_mib"], ref["process_peak_mib"]),
        })
        del tensors, outputs
    return records


def evaluate_targets(records: Sequence[dict]) -> list[dict]:
    """The issue's targets at the target shape, PASS/MISS; "n/a" where not measured or another device."""
    out = []
    match = [r for r in records if all(r["config"][f] == getattr(TARGET, f) for f in ("n", "M", "ratio", "H", "D"))]
    for name, metric, device, threshold, lower_better in TARGETS:
        value, note = None, "target shape not in this run"
        if match:
            r = match[0]
            if device is not None and r["config"]["device"] != device:
                out.append({"name": name, "metric": metric, "threshold": threshold, "value": None, "status": "n/a",
                            "note": f"measured on {r['config']['device']}"})
                continue
            value = r[metric] if metric == "peak_ratio" else r["speedup"][metric]
            notes = r["results"]["ours"]["notes"] + r["results"].get("reference", {}).get("notes", [])
            note = "; ".join(notes) or ("not measured" if value is None else None)
        status = "n/a" if value is None else "PASS" if (value <= threshold if lower_better else value >= threshold) \
            else "MISS"
        out.append({"name": name, "metric": metric, "threshold": threshold, "value": value, "status": status,
                    "note": note})
    return out


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def format_records(records: Sequence[dict]) -> str:
    header = ["n", "M", "ratio", "Nq", "Nk", "Nc", "ours fwd", "ref fwd", "ours f+b", "ref f+b", "x fwd", "x f+b",
              "GFLOP/s f+b", "ours MiB", "ref MiB", "mem ratio", "ours RSS", "ref RSS", "max|diff|"]
    rows = []
    for r in records:
        c, ours, ref = r["config"], r["results"]["ours"], r["results"].get("reference", _empty_result())
        rows.append([c["n"], c["M"], c["ratio"], c["Nq"], c["Nk"], c["Nc"],
                     common.fmt(ours["fwd_ms"], ".1f"), common.fmt(ref["fwd_ms"], ".1f"),
                     common.fmt(ours["fwd_bwd_ms"], ".1f"), common.fmt(ref["fwd_bwd_ms"], ".1f"),
                     *(common.fmt(r["speedup"][f"{m}_speedup"], ".2f") for m in MODES),
                     common.fmt(ours["fwd_bwd_gflops"], ".1f"),
                     common.fmt(ours["peak_mib"], ".0f"), common.fmt(ref["peak_mib"], ".0f"),
                     common.fmt(r["peak_ratio"], ".3f"),
                     common.fmt(ours["process_peak_mib"], ".0f"), common.fmt(ref["process_peak_mib"], ".0f"),
                     common.fmt(ref["max_abs_diff_vs_ours"], ".1e")])
    return "\n".join([common.format_table(header, rows)] + common.note_lines(records))


def format_targets(targets: Sequence[dict]) -> str:
    return common.format_targets(f"targets (Nq={TARGET.Nq}, Nk={TARGET.Nk}, ratio={TARGET.ratio}, H={TARGET.H}, "
                                 f"D={TARGET.D}):", targets)


def plot(records: Sequence[dict], path: str) -> bool:
    """Forward+backward speedup and peak-memory ratio vs ratio, one line per (n, M). False without matplotlib."""
    plt = common.pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict = {}
    for r in records:
        series.setdefault((r["config"]["n"], r["config"]["M"]), []).append(r)
    for (n, M), rows in sorted(series.items()):
        speed = sorted((r["config"]["ratio"], r["speedup"]["fwd_bwd_speedup"]) for r in rows
                       if r["speedup"]["fwd_bwd_speedup"] is not None)
        mem = sorted((r["config"]["ratio"], r["peak_ratio"]) for r in rows if r["peak_ratio"] is not None)
        if speed:
            axes[0].plot(*zip(*speed), marker="o", label=f"n={n} M={M}")
        if mem:
            axes[1].plot(*zip(*mem), marker="o", label=f"n={n} M={M}")
    axes[0].set_title("forward+backward: reference time / ours")
    axes[1].set_title("peak memory: ours / reference")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("compression ratio")
        ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure_atomic(fig, path)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="grid", action="store_const", const="quick",
                      help="the target shape (Nq=16384, Nk=6144, ratio 3) and the seed's n=64, M=5 shape at "
                           "ratios 1-4 (default; about two minutes on 2 CPU cores)")
    size.add_argument("--full", dest="grid", action="store_const", const="full",
                      help="n in {64, 128, 256} x M in {5, 20, 64} x ratio 1-4 (long on a CPU)")
    parser.set_defaults(grid="quick")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=tuple(common.DTYPES), default="float32")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="results file (default bench_results/compressed_attention-<device>.json)")
    parser.add_argument("--plot", metavar="PATH", default=None, help="plot (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions, at most (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")


def main(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = {"grid": args.grid, "device": device, "dtype": args.dtype, "reps": args.reps, "warmup": args.warmup,
                "budget_s": 3.0, "memory": args.memory, "threads": torch.get_num_threads()}
    env = common.environment(torch.device(device))
    print(f"af2_ext compressed_attention benchmark: {env['device_name']} ({device}, cpu_isa={env['cpu_isa']}, "
          f"threads={env['threads']}), torch {env['torch']}, {args.dtype}, B=1 H=8 D=64, {args.grid} grid",
          flush=True)
    started = time.perf_counter()
    records = run_compressed_attention(FULL if args.grid == "full" else QUICK, device=device, dtype=args.dtype,
                                       reps=args.reps, warmup=args.warmup, budget_s=settings["budget_s"],
                                       memory=args.memory)
    settings["wall_s"] = round(time.perf_counter() - started, 1)
    targets = evaluate_targets(records)
    doc = {"benchmark": "compressed_attention", "environment": env, "settings": settings, "records": records,
           "targets": targets}
    print("times: median ms; x = reference time / ours; MiB: peak increase of one fwd+bwd; RSS: the child "
          "process's whole high-water mark (CPU)")
    print(format_records(records))
    print()
    print(format_targets(targets))
    path = args.json or os.path.join("bench_results", f"compressed_attention-{device}.json")
    common.write_json_atomic(path, doc)
    print(f"\nwrote {path} ({settings['wall_s']:.0f} s)")
    if args.plot:
        common.say_plot(args.plot, plot(records, args.plot))
    return 0
