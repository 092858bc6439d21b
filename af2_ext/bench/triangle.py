"""Triangle attention benchmark: ``python -m af2_ext.bench triangle [--lengths 256,512] [...]``.

AlphaFold2's triangle attention over a pair of N residues: N rows, each a sequence of N queries attending over N
keys, a bias (B, 1, H, N, N) that all rows share and that requires grad, a bool key mask (B, N, 1, 1, N) with about
10 % of each row's keys masked (never a whole row: the baselines' additive -1e9 would not zero it). q, k and v are
(B, N, Q, H, D) tensors, as a model's projection leaves them, and each implementation takes its own view of them.
For each length and implementation it times the forward (under no_grad) and the forward+backward (gradients of q,
k, v and the bias), medians after warm-up, and measures the peak memory of one forward+backward:

- ``ours``: :func:`af2_ext.ops.triangle_attention` with ``impl="kernel"`` (dense layout, ``--block-size``);
- ``math``: OpenFold's default path (``openfold/model/primitives.py``: ``_prep_qkv`` scales q, ``_attention``
  matmuls, adds the mask bias ``1e9 * (mask - 1)`` and the triangle bias in place, softmax, matmul with v), the
  (B, N, H, N, N) logits and probabilities materialised;
- ``sdpa``: ``scaled_dot_product_attention`` on (B*N, H, N, D) with one float ``attn_mask``: SDPA takes a single
  mask, so bias + mask bias is summed into a (B*N, H, N, N) tensor, through which the bias gets its gradient;
- ``flex``: FlexAttention under ``torch.compile(dynamic=False)``, a score_mod adding the captured bias and -inf
  at masked keys. It has no CPU backward (torch 2.13): there its fwd+bwd is recorded as unsupported;
- CUDA only, each where it imports: ``cueq`` (``cuequivariance_torch.triangle_attention``), ``trifast`` (Triton)
  and ``ds4sci`` (DeepSpeed ``DS4Sci_EvoformerAttention``, fp16/bf16 only).

An implementation that cannot run gets a status (``unsupported: <reason>``, ``skipped: not installed (...)``,
``skipped: needs ~X GiB``) and the run goes on. ``math`` and ``sdpa`` are skipped where their estimated memory
does not fit.

Correctness: at the smallest length each baseline's output and bias gradient are compared with ours (max abs
difference, printed); one off by more than the dtype's tolerance is marked FAIL and never counts as the fastest.

Peak memory of one forward+backward, the inputs excluded and the gradients it returns included. CUDA:
``max_memory_allocated`` above what was allocated before. CPU: the resident-set increase measured in a fresh child
process per (length, impl) (:func:`af2_ext.bench.common.run_child` and ``child_peak_rss_mib``): after one warm-up
call the kernel's high-water mark VmHWM is reset and the peak is VmHWM - VmRSS around one call; the child runs
with a fixed glibc mmap threshold so each freed tensor leaves the RSS at once. A child because VmHWM resets only
per process and this one holds compile caches and the earlier implementations' freed memory; RSS rather than the
torch profiler because it counts every page a call touches (kernel scratch, OpenMP stacks), not only what goes
through torch's allocator. The output and gradients alone (``returned_mib``, printed against the fastest baseline's
peak) are the floor under every implementation's peak.

Determinism (``--check-determinism``, on by default): ours' bias gradient on a small shape must be bitwise equal
across two runs and between the run's thread count and ``torch.set_num_threads(1)``.

Ratios: ``x fastest baseline`` is the fwd+bwd time of the fastest passing baseline among math, sdpa and flex over
ours'; ``peak / baseline`` is ours' peak over that baseline's. The JSON also has ours against every baseline.
Targets (printed, never asserted): CPU fp32, B=1, H=4, D=32, N=256 and N=512: ours' fwd+bwd >= 3x the fastest
baseline's and its peak <= 1/10 of that baseline's.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from af2_ext import ops
from af2_ext.bench import attention, common
from af2_ext.bench.compressed_attention import available_bytes
from af2_ext.bench.model_scan import _int_list

IMPLS = ("ours", "math", "sdpa", "flex", "cueq", "trifast", "ds4sci")
CPU_IMPLS = ("ours", "math", "sdpa", "flex")
CUDA_ONLY = ("cueq", "trifast", "ds4sci")
TORCH_BASELINES = ("math", "sdpa", "flex")  # the ones "x fastest baseline" is taken over
DENSE = ("math", "sdpa")  # materialise (B, N, H, N, N) scores
MODES = ("fwd", "fwd_bwd")
DEFAULT_LENGTHS = (256, 512)
OPENFOLD_INF = 1e9  # TriangleAttention(inf=1e9): the mask bias is inf * (mask - 1)
MASKED_FRACTION = 0.1
# (B, N, H, N, N) score-sized tensors the dense baselines hold at once in fwd+bwd (scores, probabilities, their
# gradients, SDPA's summed mask), and the share of the available memory they may take.
DENSE_TENSORS = 6
MEMORY_FRACTION = 0.6
# Correctness: max |baseline - ours| <= tolerance * max(1, max |ours|), per compared tensor.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
DETERMINISM_MAX_N = 128

TARGET_SHAPE = {"device": "cpu", "dtype": "float32", "B": 1, "H": 4, "D": 32, "block_size": 64}
# (N, metric, threshold, lower is better)
TARGETS = ((256, "x_fastest_baseline", 3.0, False), (256, "peak_vs_fastest_baseline", 0.1, True),
           (512, "x_fastest_baseline", 3.0, False), (512, "peak_vs_fastest_baseline", 0.1, True))

Forward = Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TriangleConfig:
    """One length: q, k, v (B, N, N, H, D), bias (B, 1, H, N, N), mask (B, N, 1, 1, N)."""

    N: int
    B: int = 1
    H: int = 4
    D: int = 32
    block_size: int = 64


def flops(config: TriangleConfig, mode: str) -> float:
    """Dense attention on B * N rows of N queries and N keys: :func:`af2_ext.bench.attention.flops`."""
    return attention.flops(config.B * config.N, config.H, config.N, config.N, config.D, 1.0, mode)


def returned_bytes(config: TriangleConfig, dtype: str) -> int:
    """The output and the q, k, v and bias gradients: every implementation returns them, and each peak counts them."""
    itemsize = torch.empty((), dtype=common.DTYPES[dtype]).element_size()
    return itemsize * config.B * config.H * config.N * config.N * (4 * config.D + 1)


def dense_bytes(config: TriangleConfig, dtype: str) -> int:
    """Rough memory of a dense baseline's forward+backward (see DENSE_TENSORS)."""
    itemsize = torch.empty((), dtype=common.DTYPES[dtype]).element_size()
    return DENSE_TENSORS * itemsize * config.B * config.N * config.H * config.N * config.N


# ----------------------------------------------------------------------------------------------------------
# Implementations: each builder returns forward(q, k, v, bias, mask) -> (B, N, H, Q, D), q, k, v (B, N, Q, H, D);
# it raises ImportError where its package is missing and anything else where it cannot run
# ----------------------------------------------------------------------------------------------------------


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(2, 3)  # [b, n, q, h, d] -> [b, n, h, q, d], a view


def _mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    inf = min(OPENFOLD_INF, torch.finfo(dtype).max)
    return inf * (mask.to(dtype) - 1)  # [b, n, 1, 1, k]


def _ours(config: TriangleConfig) -> Forward:
    def forward(q, k, v, bias, mask):
        return ops.triangle_attention(_heads_first(q), _heads_first(k), _heads_first(v), bias, mask,
                                      block_size=config.block_size, impl="kernel")
    return forward


def _math(config: TriangleConfig) -> Forward:
    def forward(q, k, v, bias, mask):
        q = _heads_first(q) * q.shape[-1] ** -0.5  # [b, n, h, q, d]
        a = torch.matmul(q, k.permute(0, 1, 3, 4, 2))  # [b, n, h, q, k]
        a += _mask_bias(mask, a.dtype)
        a += bias  # [b, 1, h, q, k]
        a = torch.softmax(a, dim=-1)
        return torch.matmul(a, _heads_first(v))  # [b, n, h, q, d]
    return forward


def _sdpa(config: TriangleConfig) -> Forward:
    def forward(q, k, v, bias, mask):
        B, N, Q, H, D = q.shape
        K = k.shape[2]
        attn_mask = (bias + _mask_bias(mask, bias.dtype)).reshape(B * N, H, Q, K)  # [b*n, h, q, k]
        q4, k4, v4 = (_heads_first(t).reshape(B * N, H, -1, D) for t in (q, k, v))  # [b*n, h, q|k, d] views
        out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=attn_mask)
        return out.reshape(B, N, H, Q, D)
    return forward


def _flex(config: TriangleConfig) -> Forward:
    from torch.nn.attention.flex_attention import flex_attention

    def attend(q, k, v, bias, keep):  # q, k, v [b*n, h, q|k, d]; bias [b, h, q, k]; keep [b*n, k]
        rows = q.shape[0] // bias.shape[0]

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(keep[b, kv_idx], score + bias[b // rows, h, q_idx, kv_idx], -float("inf"))

        return flex_attention(q, k, v, score_mod=score_mod)

    torch._dynamo.reset()  # a fresh, static compile per length
    compiled = torch.compile(attend, dynamic=False)

    def forward(q, k, v, bias, mask):
        B, N, Q, H, D = q.shape
        q4, k4, v4 = (_heads_first(t).reshape(B * N, H, -1, D) for t in (q, k, v))
        return compiled(q4, k4, v4, bias.squeeze(1), mask.reshape(B * N, -1)).reshape(B, N, H, Q, D)
    return forward


def _cueq(config: TriangleConfig) -> Forward:
    import cuequivariance_torch

    triangle_attention = cuequivariance_torch.triangle_attention  # (B, N, H, Q, D), bias (B, 1, H, Q, K), mask keep

    def forward(q, k, v, bias, mask):
        return triangle_attention(_heads_first(q), _heads_first(k), _heads_first(v), bias, mask)
    return forward


def _trifast(config: TriangleConfig) -> Forward:
    try:
        from trifast import triangle_attention
    except ImportError:
        from trifast.torch import triangle_attention

    def forward(q, k, v, bias, mask):
        B, N = q.shape[:2]
        q5, k5, v5 = (t.permute(0, 3, 1, 2, 4) for t in (q, k, v))  # [b, h, n, q|k, d]
        out = triangle_attention(q5, k5, v5, bias.squeeze(1), ~mask.reshape(B, N, -1))  # trifast: True = masked
        return out.permute(0, 2, 1, 3, 4)  # [b, h, n, q, d] -> [b, n, h, q, d]
    return forward


def _ds4sci(config: TriangleConfig) -> Forward:
    from deepspeed.ops.deepspeed4science import DS4Sci_EvoformerAttention

    def forward(q, k, v, bias, mask):  # its layout is ours: [b, n, q, h, d]
        return _heads_first(DS4Sci_EvoformerAttention(q, k, v, [_mask_bias(mask, q.dtype), bias.to(q.dtype)]))
    return forward


BUILDERS = {"ours": _ours, "math": _math, "sdpa": _sdpa, "flex": _flex, "cueq": _cueq, "trifast": _trifast,
            "ds4sci": _ds4sci}


def make_inputs(config: TriangleConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    B, N, H, D = config.B, config.N, config.H, config.D

    def randn(*shape):
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    q, k, v = (randn(B, N, N, H, D) for _ in range(3))  # [b, n, q|k, h, d]
    bias = randn(B, 1, H, N, N)
    mask = torch.rand((B, N, 1, 1, N), generator=generator) >= MASKED_FRACTION
    mask[..., 0] = True  # no row without keys
    return {"q": q, "k": k, "v": v, "bias": bias, "mask": mask.to(device), "grad_out": randn(B, N, H, N, D)}


def _steps(forward: Forward, inputs: dict) -> tuple[Callable, Callable]:
    """(forward under no_grad, forward+backward returning (out, (dq, dk, dv, dbias)))."""
    names = ("q", "k", "v", "bias")
    leaves = [inputs[n].detach().clone().requires_grad_() for n in names]

    def fwd():
        with torch.no_grad():
            return forward(*(inputs[n] for n in names), inputs["mask"])

    def fwd_bwd():
        out = forward(*leaves, inputs["mask"])
        return out, torch.autograd.grad(out, leaves, inputs["grad_out"])

    return fwd, fwd_bwd


# ----------------------------------------------------------------------------------------------------------
# Peak memory on CPU: one forward+backward in a fresh child process
# ----------------------------------------------------------------------------------------------------------

_CHILD = "from af2_ext.bench.triangle import _memory_child_main; _memory_child_main()"


def _memory_child_main() -> None:
    import json

    payload = json.loads(sys.stdin.read())
    torch.set_num_threads(payload["threads"])
    config = TriangleConfig(**payload["config"])
    device = torch.device(payload["device"])
    inputs = make_inputs(config, device, common.DTYPES[payload["dtype"]], payload["seed"])
    _, fwd_bwd = _steps(BUILDERS[payload["impl"]](config), inputs)
    print(json.dumps(common.child_peak_rss_mib(fwd_bwd, warmup=fwd_bwd)))


def _peak(impl: str, fwd_bwd: Callable, config: TriangleConfig, device: torch.device, dtype: str, threads: int,
          seed: int) -> dict:
    if device.type == "cuda":
        return {"peak_mib": common.cuda_peak_mib(fwd_bwd, device), "method": "torch.cuda.max_memory_allocated"}
    payload = {"config": dataclasses.asdict(config), "impl": impl, "device": device.type, "dtype": dtype,
               "threads": threads, "seed": seed}
    return common.run_child(_CHILD, payload, threads=threads, timeout_s=1800)


# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------


def _empty_result() -> dict:
    return {"status": None, "fwd_ms": None, "fwd_bwd_ms": None, "fwd_gflops": None, "fwd_bwd_gflops": None,
            "peak_mib": None, "process_peak_mib": None, "peak_method": None, "notes": []}


def _measure(impl: str, config: TriangleConfig, inputs: dict, device: torch.device, dtype: str, *, warmup: int,
             reps: int, budget_s: float, memory: bool, threads: int, seed: int,
             keep: bool) -> tuple[dict, Optional[dict]]:
    """Times one implementation at one length; with ``keep`` also returns its output and gradients (fp32)."""
    result = _empty_result()
    if impl in CUDA_ONLY and device.type != "cuda":
        result["status"] = "skipped: CUDA only"
        return result, None
    try:
        forward = BUILDERS[impl](config)
    except ImportError as error:
        result["status"] = f"skipped: not installed ({common.reason(error)})"
        return result, None
    except Exception as error:  # noqa: BLE001  whatever stops a baseline is recorded, never the end of the run
        result["status"] = f"unsupported: {common.reason(error)}"
        return result, None
    if impl in DENSE:
        need, have = dense_bytes(config, dtype), available_bytes(device)
        if need > MEMORY_FRACTION * have:
            result["status"] = (f"skipped: needs ~{need / 2**20:,.0f} MiB for its N x N scores per row, "
                                f"{have / 2**20:,.0f} MiB available")
            return result, None
    fwd, fwd_bwd = _steps(forward, inputs)
    try:
        out = fwd()  # the first call compiles (flex), outside the timing
        result["fwd_ms"] = common.time_ms(fwd, device, warmup=warmup, reps=reps, budget_s=budget_s)
    except Exception as error:  # noqa: BLE001
        result["status"] = f"unsupported: {common.reason(error)}"
        return result, None
    kept = {"out": out.float()} if keep else None
    del out
    try:
        fwd_bwd()
        result["fwd_bwd_ms"] = common.time_ms(fwd_bwd, device, warmup=warmup, reps=reps, budget_s=budget_s)
    except Exception as error:  # noqa: BLE001
        result["status"] = f"unsupported: fwd+bwd: {common.reason(error)}"
    else:
        result["status"] = "ok"
        if keep:
            kept.update(zip(("dq", "dk", "dv", "dbias"), (g.float() for g in fwd_bwd()[1])))
    for mode in MODES:
        if result[f"{mode}_ms"] is not None:
            result[f"{mode}_gflops"] = flops(config, mode) / (result[f"{mode}_ms"] * 1e-3) / 1e9
    if memory and result["status"] == "ok":
        try:
            measured = _peak(impl, fwd_bwd, config, device, dtype, threads, seed)
            result["peak_mib"] = measured["peak_mib"]
            result["process_peak_mib"] = measured.get("process_peak_mib")
            result["peak_method"] = measured["method"]
        except Exception as error:  # noqa: BLE001
            result["notes"].append(f"memory skipped: {common.reason(error)}")
    return result, kept


def compare(outputs: dict, dtype: str) -> dict:
    """Each baseline's max abs difference from ours (output, dq, dk, dv, dbias: those both have) and its verdict."""
    tolerance = TOLERANCE[dtype]
    ours = outputs.get("ours")
    verdicts = {}
    for impl, kept in outputs.items():
        if impl == "ours":
            continue
        entry = {"passed": None, "note": None}
        if ours is None or kept is None:
            entry["note"] = "not compared: " + ("ours did not run" if ours is None else "it did not run")
            verdicts[impl] = entry
            continue
        passed = True
        for name in ("out", "dq", "dk", "dv", "dbias"):
            if name not in kept or name not in ours:
                entry[name] = None
                continue
            diff = (kept[name] - ours[name]).abs().max().item()
            scale = max(1.0, ours[name].abs().max().item())
            entry[name] = diff if math.isfinite(diff) else None
            passed = passed and math.isfinite(diff) and diff <= tolerance * scale
        entry["passed"] = passed
        verdicts[impl] = entry
    return {"tolerance": tolerance, "results": verdicts}


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return None if num is None or den is None or den <= 0 else num / den


def summarise(record: dict, check: dict) -> None:
    """Adds ``fastest_baseline``, ``x_fastest_baseline``, ``peak_vs_fastest_baseline`` and ``vs_baselines`` to a
    record in place: only baselines whose correctness check passed count."""
    results, ours = record["results"], record["results"].get("ours", _empty_result())
    passed = {impl for impl, entry in check["results"].items() if entry["passed"]}
    candidates = [b for b in TORCH_BASELINES if b in passed and results.get(b, {}).get("fwd_bwd_ms") is not None]
    fastest = min(candidates, key=lambda b: results[b]["fwd_bwd_ms"]) if candidates else None
    record["fastest_baseline"] = fastest
    record["x_fastest_baseline"] = _ratio(results[fastest]["fwd_bwd_ms"], ours["fwd_bwd_ms"]) if fastest else None
    record["peak_vs_fastest_baseline"] = _ratio(ours["peak_mib"], results[fastest]["peak_mib"]) if fastest else None
    record["returned_vs_fastest_baseline_peak"] = _ratio(record["returned_mib"], results[fastest]["peak_mib"]) \
        if fastest else None
    record["vs_baselines"] = {
        b: {"x_fwd": _ratio(res["fwd_ms"], ours["fwd_ms"]), "x_fwd_bwd": _ratio(res["fwd_bwd_ms"], ours["fwd_bwd_ms"]),
            "peak_ratio": _ratio(ours["peak_mib"], res["peak_mib"]), "check_passed": check["results"].get(b, {})
            .get("passed")}
        for b, res in results.items() if b != "ours"}


def check_determinism(config: TriangleConfig, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> dict:
    """Ours' bias gradient twice with the current thread count and once with one thread: bitwise equal?"""
    torch_device = torch.device(device)
    config = dataclasses.replace(config, N=min(config.N, DETERMINISM_MAX_N))
    inputs = make_inputs(config, torch_device, common.DTYPES[dtype], seed)
    _, fwd_bwd = _steps(_ours(config), inputs)
    threads = torch.get_num_threads()
    many = threads if threads > 1 else max(2, os.cpu_count() or 2)  # never compare one thread with itself
    grads = []
    try:
        for count in (many, many, 1):
            torch.set_num_threads(count)
            grads.append(fwd_bwd()[1][3].detach().clone())
    except Exception as error:  # noqa: BLE001
        return {"config": dataclasses.asdict(config), "deterministic": None, "note": f"not run: {common.reason(error)}"}
    finally:
        torch.set_num_threads(threads)

    def diff(a, b):
        return (a.float() - b.float()).abs().max().item()

    repeat, across = torch.equal(grads[0], grads[1]), torch.equal(grads[0], grads[2])
    return {"config": dataclasses.asdict(config), "threads": [many, 1], "repeat_equal": repeat,
            "threads_equal": across, "max_abs_diff_repeat": diff(grads[0], grads[1]),
            "max_abs_diff_threads": diff(grads[0], grads[2]), "deterministic": repeat and across, "note": None}


def run_triangle(lengths: Sequence[int] = DEFAULT_LENGTHS, *, B: int = 1, H: int = 4, D: int = 32,
                 block_size: int = 64, device: str = "cpu", dtype: str = "float32",
                 impls: Optional[Sequence[str]] = None, reps: int = 5, warmup: int = 1, budget_s: float = 5.0,
                 threads: Optional[int] = None, memory: bool = True, seed: int = 0,
                 show_progress: bool = True) -> tuple[list[dict], dict]:
    """Benchmark each length; returns (records, correctness check at the smallest length).

    Args:
        lengths: N values. B, H, D, block_size: the shape and ours' tile.
        device: "cpu" or "cuda". dtype: of q, k, v and the bias.
        impls: a subset of :data:`IMPLS` (default :data:`CPU_IMPLS` on CPU, all on CUDA).
        reps, warmup, budget_s: see :func:`af2_ext.bench.common.time_ms`.
        threads: ``torch.set_num_threads`` for the run; None keeps the current setting.
        memory: measure each implementation's peak memory of one forward+backward.
        seed: input seed.

    Returns:
        Records ``{"config", "flops", "results": {impl: {status, fwd_ms, fwd_bwd_ms, fwd_gflops, fwd_bwd_gflops,
        peak_mib, process_peak_mib, peak_method, notes}}, "fastest_baseline", "x_fastest_baseline",
        "peak_vs_fastest_baseline", "returned_mib", "returned_vs_fastest_baseline_peak", "vs_baselines"}``
        (ms, GFLOP/s, MiB; None where not measured) and the check ``{"N", "tolerance", "results": {baseline: {out,
        dq, dk, dv, dbias, passed, note}}}``.
    """
    torch_device = torch.device(device)
    impls = list(impls or (IMPLS if torch_device.type == "cuda" else CPU_IMPLS))
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise ValueError(f"impls must be a subset of {IMPLS}, got {sorted(unknown)}")
    if "ours" not in impls:
        impls.insert(0, "ours")  # every ratio and check is against ours
    if dtype not in common.DTYPES:
        raise ValueError(f"dtype must be one of {tuple(common.DTYPES)}, got {dtype!r}")
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    if threads is not None:
        torch.set_num_threads(threads)
    timing = dict(warmup=warmup, reps=reps, budget_s=budget_s, memory=memory, threads=torch.get_num_threads(),
                  seed=seed)
    lengths = sorted(set(lengths))
    records = {n: {"config": {**dataclasses.asdict(TriangleConfig(n, B, H, D, block_size)), "dtype": dtype,
                              "device": torch_device.type},
                   "flops": {mode: flops(TriangleConfig(n, B, H, D, block_size), mode) for mode in MODES},
                   "returned_mib": returned_bytes(TriangleConfig(n, B, H, D, block_size), dtype) / 2**20,
                   "results": {}} for n in lengths}
    outputs: dict = {}
    inputs, inputs_n = None, None
    jobs = [(n, impl) for n in lengths for impl in impls]
    for n, impl in (common.progress(jobs, lambda job: f"N={job[0]} {job[1]}") if show_progress else jobs):
        config = TriangleConfig(n, B, H, D, block_size)
        if inputs_n != n:
            inputs, inputs_n = None, n
            inputs = make_inputs(config, torch_device, common.DTYPES[dtype], seed)
        keep = n == lengths[0]
        records[n]["results"][impl], kept = _measure(impl, config, inputs, torch_device, dtype, keep=keep, **timing)
        if keep:
            outputs[impl] = kept
    check = {"N": lengths[0], **compare(outputs, dtype)}
    for record in records.values():
        summarise(record, check)
    return list(records.values()), check


def evaluate_targets(records: Sequence[dict]) -> list[dict]:
    """The issue's targets, PASS/MISS from the matching record; "n/a" where the target shape was not run."""
    out = []
    for n, metric, threshold, lower_better in TARGETS:
        what = "fwd+bwd: fastest baseline / ours" if metric == "x_fastest_baseline" else "peak: ours / that baseline"
        name = f"N={n} {what} ({'<=' if lower_better else '>='} {threshold:g})"
        match = [r for r in records if r["config"]["N"] == n
                 and all(r["config"][field] == value for field, value in TARGET_SHAPE.items())]
        value, note = None, "target shape not in this run"
        if match:
            r = match[0]
            value = r[metric]
            note = None if value is not None else "; ".join(
                f"{impl}: {res['status']}" for impl, res in r["results"].items() if res["status"] != "ok") or \
                "not measured"
        status = "n/a" if value is None else "PASS" if (value <= threshold if lower_better else value >= threshold) \
            else "MISS"
        out.append({"name": name, "N": n, "metric": metric, "threshold": threshold, "value": value,
                    "baseline": match[0]["fastest_baseline"] if match else None, "status": status, "note": note})
    return out


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def format_records(records: Sequence[dict], check: dict) -> str:
    header = ["impl", "N", "status", "fwd ms", "fwd+bwd ms", "GFLOP/s f+b", "peak MiB", "check",
              "x fastest baseline", "peak / baseline"]
    rows = []
    for r in records:
        for impl, res in r["results"].items():
            verdict = check["results"].get(impl, {}).get("passed")
            row = [impl, r["config"]["N"], res["status"] if len(res["status"]) <= 40 else res["status"][:37] + "...",
                   common.fmt(res["fwd_ms"], ".1f"), common.fmt(res["fwd_bwd_ms"], ".1f"),
                   common.fmt(res["fwd_bwd_gflops"], ".1f"), common.fmt(res["peak_mib"], ".1f"),
                   "-" if verdict is None else "pass" if verdict else "FAIL", "-", "-"]
            if impl == "ours" and r["fastest_baseline"]:
                row[-2] = f"{common.fmt(r['x_fastest_baseline'])}x ({r['fastest_baseline']})"
                row[-1] = common.fmt(r["peak_vs_fastest_baseline"], ".3f")
            rows.append(row)
    lines = [common.format_table(header, rows)]
    lines += [f"status: {impl} N={r['config']['N']}: {res['status']}" for r in records
              for impl, res in r["results"].items() if len(res["status"]) > 40]
    return "\n".join(lines + common.note_lines(records))


def format_check(check: dict) -> str:
    lines = [f"correctness at N={check['N']}, max |baseline - ours| (pass: <= {check['tolerance']:g} x "
             "max(1, max |ours|)):"]
    for impl, entry in check["results"].items():
        if entry["passed"] is None:
            lines.append(f"  {impl:<8} {entry['note']}")
            continue
        lines.append(f"  {impl:<8} output {common.fmt(entry['out'], '.2e'):>9}  bias grad "
                     f"{common.fmt(entry['dbias'], '.2e'):>9}  {'pass' if entry['passed'] else 'FAIL'}")
    return "\n".join(lines)


def format_determinism(result: Optional[dict]) -> str:
    if result is None:
        return "determinism: not checked (--no-check-determinism)"
    if result["deterministic"] is None:
        return f"determinism: {result['note']}"
    c = result["config"]
    verdict = "bitwise equal" if result["deterministic"] else "NOT bitwise equal"
    return (f"determinism (ours' bias gradient, N={c['N']} H={c['H']} D={c['D']}): {verdict} "
            f"[two runs: {'equal' if result['repeat_equal'] else 'max diff %.2e' % result['max_abs_diff_repeat']}; "
            f"{result['threads'][0]} vs 1 threads: "
            f"{'equal' if result['threads_equal'] else 'max diff %.2e' % result['max_abs_diff_threads']}]")


def format_returned(records: Sequence[dict]) -> str:
    """What no implementation can go below: its output and gradients, against the fastest baseline's peak."""
    parts = [f"N={r['config']['N']} {r['returned_mib']:.0f} MiB"
             + (f" = {r['returned_vs_fastest_baseline_peak']:.3f} of {r['fastest_baseline']}'s peak"
                if r["returned_vs_fastest_baseline_peak"] is not None else "") for r in records]
    return "output + q, k, v, bias gradients alone (in every peak): " + "; ".join(parts)


def format_targets(targets: Sequence[dict]) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in TARGET_SHAPE.items())
    return common.format_targets(f"targets ({shape}; the baseline: the fastest passing one of "
                                 f"{', '.join(TORCH_BASELINES)}):", targets, width=52)


def plot(records: Sequence[dict], path: str) -> bool:
    """Forward+backward time and peak memory against N, one line per implementation. False without matplotlib."""
    plt = common.pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for impl in IMPLS:
        for ax, key in zip(axes, ("fwd_bwd_ms", "peak_mib")):
            points = [(r["config"]["N"], r["results"][impl][key]) for r in records
                      if impl in r["results"] and r["results"][impl][key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
    axes[0].set_title("forward+backward (ms)")
    axes[1].set_title("peak memory of one forward+backward (MiB)")
    for ax in axes:
        ax.set_xlabel("N (residues)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure_atomic(fig, path)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=_int_list, default=list(DEFAULT_LENGTHS),
                        help="N values, comma separated (default 256,512)")
    parser.add_argument("--batch", type=int, default=1, help="B (default 1)")
    parser.add_argument("--heads", type=int, default=4, help="H (default 4)")
    parser.add_argument("--dim", type=int, default=32, help="head dim D (default 32)")
    parser.add_argument("--block-size", type=int, choices=ops.BLOCK_SIZES, default=64,
                        help="ours' tile (default 64)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=tuple(common.DTYPES), default="float32")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=None, metavar="IMPL",
                        help=f"any of {' '.join(IMPLS)} (default {' '.join(CPU_IMPLS)} on CPU, all on CUDA; "
                             "ours always runs)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="results file (default bench_results/triangle-<device>.json)")
    parser.add_argument("--plot", metavar="PATH", default=None, help="time and memory against N (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--check-determinism", action=argparse.BooleanOptionalAction, default=True,
                        help="ours' bias gradient bitwise equal across runs and thread counts (default on)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions, at most (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="the first length only, at most 3 repetitions (the GPU check script's mode)")


def main(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    impls = args.impls or list(IMPLS if device == "cuda" else CPU_IMPLS)
    if args.quick:
        args.lengths, args.reps = args.lengths[:1], min(args.reps, 3)
    settings = {"lengths": sorted(set(args.lengths)), "B": args.batch, "H": args.heads, "D": args.dim,
                "block_size": args.block_size, "device": device, "dtype": args.dtype, "impls": impls,
                "reps": args.reps, "warmup": args.warmup, "budget_s": 5.0, "memory": args.memory,
                "threads": torch.get_num_threads(), "masked_fraction": MASKED_FRACTION}
    env = common.environment(torch.device(device))
    print(f"af2_ext triangle attention benchmark: {env['device_name']} ({device}, cpu_isa={env['cpu_isa']}, "
          f"threads={env['threads']}), torch {env['torch']}, {args.dtype}, B={args.batch} H={args.heads} "
          f"D={args.dim} block {args.block_size}, N in {settings['lengths']}", flush=True)
    started = time.perf_counter()
    records, check = run_triangle(settings["lengths"], B=args.batch, H=args.heads, D=args.dim,
                                  block_size=args.block_size, device=device, dtype=args.dtype, impls=impls,
                                  reps=args.reps, warmup=args.warmup, budget_s=settings["budget_s"],
                                  memory=args.memory)
    determinism = None
    if args.check_determinism:
        determinism = check_determinism(TriangleConfig(settings["lengths"][0], args.batch, args.heads, args.dim,
                                                       args.block_size), device, args.dtype)
    settings["wall_s"] = round(time.perf_counter() - started, 1)
    targets = evaluate_targets(records)
    doc = {"benchmark": "triangle", "environment": env, "settings": settings, "records": records, "check": check,
           "determinism": determinism, "targets": targets}
    print("times: median ms; peak: increase of one fwd+bwd over its inputs (CPU: RSS in a fresh child process); "
          "x fastest baseline: its fwd+bwd time / ours; peak / baseline: ours / that baseline's")
    print(format_records(records, check))
    print()
    print(format_check(check))
    print(format_determinism(determinism))
    print()
    print(format_targets(targets))
    print(format_returned(records))
    path = args.json or os.path.join("bench_results", f"triangle-{device}.json")
    common.write_json_atomic(path, doc)
    print(f"\nwrote {path} ({settings['wall_s']:.0f} s)")
    if args.plot:
        common.say_plot(args.plot, plot(records, args.plot))
    return 0
