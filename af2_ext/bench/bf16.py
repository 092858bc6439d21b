"""bf16 on the CPU: ``python -m af2_ext.bench bf16 [--quick] [--reps N] [--no-model] [--plot PATH]``.

Issue 18's shapes: block-sparse self-attention, B 1, H 8, N 1024, D 32 and 64, BigBird layouts of ~25 % density
at block 64 (:func:`af2_ext.bench.attention.make_layout`), q, k, v drawn from a normal.

Every implementation is timed in rounds (:func:`time_interleaved`): per round, one untimed call of each, then
five timed calls in a row, so that a slow spell of a shared machine hits all alike; medians of the rounds.

- forward (under no_grad): ours in bf16 (the bf16 dot-product kernel where the CPU has AVX512-BF16, ``cpu_isa``
  says which), ours in fp32, dense ``scaled_dot_product_attention`` in bf16 and FlexAttention in bf16
  (``torch.compile(dynamic=False)``, the same block mask);
- forward+backward (gradients of q, k, v): ours bf16, ours fp32, dense SDPA bf16;
- GFLOP/s on the computed blocks (:func:`af2_ext.bench.attention.flops`: the dense SDPA is credited with the
  sparse work only, as the issue's ratios compare time), and the dense matmul rates in fp32 and bf16 measured in the
  same run (2048^3; 1024^3 with ``--quick``; the fastest call) as the ceilings;
- a correctness check of ours in bf16: its error against the fp32 reference must be within twice that of the
  reference computed in bf16 (the project's low-precision rule), else the row says FAIL;
- unless ``--no-model``: the model's training step (README width: dim 256, depth 2, heads 8 x 64, n 128, MSA
  5 x 128) in fp32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

Targets (issue 18, ratios within this run): forward bf16 >= 3x dense SDPA bf16 and >= 2x our fp32 kernel, at D 32
and D 64; forward+backward bf16 >= 2x dense SDPA bf16; the model step under bf16 autocast >= 1.7x fp32.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from af2_ext import layouts, ops, reference
from af2_ext.bench import common
from af2_ext.bench.attention import AttentionConfig, _flex, flops, make_layout

SHAPE = dict(B=1, H=8, N=1024, block_size=64, target_density=0.25)
HEAD_DIMS = (32, 64)


def matmul_gflops(dtype: torch.dtype, n: int, reps: int) -> float:
    """Dense (n x n) @ (n x n) in ``dtype``: GFLOP/s of the fastest call (a ceiling: the best the machine gave)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / (best * 1e9)


def time_interleaved(fns: dict, *, warmup: int, reps: int, block: int = 5) -> tuple[dict, dict]:
    """Median ms per call of each of ``fns`` (name -> callable), timed in rounds: each round gives every callable
    one untimed call (its caches warm again after the others ran) and then times ``block`` calls in a row. A slow
    spell of a shared machine then hits every implementation alike instead of one of them. ``reps`` calls in all
    (at least one round). A callable that raises is left out; ``{name: error}`` is the second dict returned."""
    failed, live = {}, {}
    for name, fn in fns.items():
        try:
            for _ in range(max(warmup, 1)):
                fn()
            live[name] = fn
        except Exception as error:  # noqa: BLE001  a baseline that cannot run is reported, not fatal
            failed[name] = common.reason(error)
    block = max(1, min(block, reps))
    times: dict = {name: [] for name in live}
    for _ in range(max(1, -(-reps // block))):
        for name, fn in live.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            times[name].append((time.perf_counter() - t0) * 1e3 / block)
    return {name: statistics.median(ts) for name, ts in times.items()}, failed


def _attention_fns(layout: torch.Tensor, block_size: int) -> dict:
    ours = lambda q, k, v: ops.block_sparse_attention(q, k, v, layout, block_size=block_size, impl="kernel")  # noqa: E731
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    return {"ours": ours, "sdpa": sdpa}


def _forward(fn, q, k, v) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn(q, k, v)
    return run


def _fwd_bwd(fn, q, k, v, grad_out) -> Callable[[], object]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    return lambda: torch.autograd.grad(fn(*leaves), leaves, grad_out)


def check_bf16(layout: torch.Tensor, block_size: int, q, k, v) -> dict:
    """Ours in bf16 against the fp32 reference, judged by the low-precision rule (error <= 2x the bf16
    reference's error, plus bf16's floor)."""
    got = ops.block_sparse_attention(*(t.bfloat16() for t in (q, k, v)), layout, block_size=block_size, impl="kernel")
    ref = reference.block_sparse_attention_ref(q, k, v, layout, block_size=block_size)
    lowp = reference.block_sparse_attention_ref(*(t.bfloat16() for t in (q, k, v)), layout, block_size=block_size)
    err, base = (got.float() - ref).abs().max().item(), (lowp.float() - ref).abs().max().item()
    return {"max_err": err, "bf16_reference_err": base, "ok": err <= 2 * base + 2 ** -8}


def run_attention(head_dims=HEAD_DIMS, *, reps: int, warmup: int, with_flex: bool) -> list[dict]:
    records = []
    for D in common.progress(list(head_dims), lambda d: f"attention D {d}"):
        config = AttentionConfig(SHAPE["N"], D, SHAPE["block_size"], SHAPE["target_density"], B=SHAPE["B"],
                                 H=SHAPE["H"])
        layout, description = make_layout(config)
        density = layouts.density(layout)
        g = torch.Generator().manual_seed(D)
        shape = (config.B, config.H, config.N, D)
        q, k, v, grad_out = (torch.randn(shape, generator=g) for _ in range(4))
        fns = _attention_fns(layout, config.block_size)
        as_bf16 = [t.bfloat16() for t in (q, k, v, grad_out)]
        notes: list = []
        timed = {
            ("fwd", "ours bf16"): _forward(fns["ours"], *as_bf16[:3]),
            ("fwd", "ours fp32"): _forward(fns["ours"], q, k, v),
            ("fwd", "sdpa bf16"): _forward(fns["sdpa"], *as_bf16[:3]),
            ("fwd_bwd", "ours bf16"): _fwd_bwd(fns["ours"], *as_bf16),
            ("fwd_bwd", "ours fp32"): _fwd_bwd(fns["ours"], q, k, v, grad_out),
            ("fwd_bwd", "sdpa bf16"): _fwd_bwd(fns["sdpa"], *as_bf16),
        }
        if with_flex:
            try:
                timed[("fwd", "flex bf16")] = _forward(_flex(layout, config.block_size), *as_bf16[:3])
            except Exception as error:  # noqa: BLE001  a baseline that cannot run is reported, not fatal
                notes.append(f"flex bf16: {common.reason(error)}")
        times, failed = time_interleaved(timed, warmup=warmup, reps=reps)
        notes += [f"{impl} {mode}: {why}" for (mode, impl), why in failed.items()]
        gflop = {mode: flops(config.B, config.H, config.N, config.N, D, density, mode) / 1e9
                 for mode in ("fwd", "fwd_bwd")}
        records.append({
            "config": {**dataclasses.asdict(config), "density": density, "layout": description},
            "ms": {f"{mode} {impl}": ms for (mode, impl), ms in times.items()},
            "gflops": {f"{mode} {impl}": gflop[mode] / (ms / 1e3) for (mode, impl), ms in times.items()},
            "check": check_bf16(layout, config.block_size, q, k, v),
            "notes": notes,
        })
    return records


def model_step_ms(reps: int, config=None) -> dict:
    """The model's training step, fp32 and under CPU bf16 autocast; ``config`` an
    :class:`af2_ext.bench.model.ModelConfig`, default the README width at n 128, MSA 5 x 128."""
    from af2_ext.bench import model as bm

    config = config or bm.ModelConfig(n=128, msa_rows=5, msa_cols=128)
    model = bm.build("ours", config, torch.device("cpu"))
    data = bm.batch(config, torch.device("cpu"))
    inputs = {k: v for k, v in data.items() if k != "target"}

    def step(autocast: bool) -> Callable[[], None]:
        def run():
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(**inputs)
            F.cross_entropy(logits.float().reshape(-1, 37), data["target"].reshape(-1)).backward()
        return run

    times, failed = time_interleaved({"fp32": step(False), "bf16 autocast": step(True)}, warmup=1, reps=reps,
                                     block=1)
    if failed:
        raise RuntimeError(f"the model step failed: {failed}")
    return times


def _bf16_path() -> str:
    if ops.cpu_isa() == "avx512_bf16":
        return ("bf16 on the bf16 dot-product kernels (the backward's fused pass with queries outer; other plans in "
                "fp32 on fp32 copies)")
    return "bf16 computed by the fp32 kernels on fp32 copies"


def _ratio(slow: Optional[float], fast: Optional[float]) -> Optional[float]:
    return None if slow is None or fast is None else slow / fast


def evaluate_targets(records: list[dict], model: Optional[dict]) -> list[dict]:
    targets = []
    for r in records:
        D, ms = r["config"]["D"], r["ms"]
        for name, key, base, threshold in (
                (f"D {D}: forward bf16 vs dense SDPA bf16", "fwd ours bf16", "fwd sdpa bf16", 3.0),
                (f"D {D}: forward bf16 vs our fp32 kernel", "fwd ours bf16", "fwd ours fp32", 2.0),
                (f"D {D}: fwd+bwd bf16 vs dense SDPA bf16", "fwd_bwd ours bf16", "fwd_bwd sdpa bf16", 2.0)):
            value = _ratio(ms.get(base), ms.get(key))
            status = "n/a" if value is None else "PASS" if value >= threshold and r["check"]["ok"] else "MISS"
            targets.append({"name": name, "value": value, "threshold_text": f">= {threshold:g}x", "status": status})
    if model is not None:
        value = _ratio(model.get("fp32"), model.get("bf16 autocast"))
        targets.append({"name": "model step: bf16 autocast vs fp32 (n 128)", "value": value,
                        "threshold_text": ">= 1.7x",
                        "status": "n/a" if value is None else "PASS" if value >= 1.7 else "MISS"})
    return targets


def plot(records: list[dict], ceilings: dict, path: str) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    impls = ["fwd ours bf16", "fwd ours fp32", "fwd sdpa bf16", "fwd flex bf16", "fwd_bwd ours bf16",
             "fwd_bwd ours fp32", "fwd_bwd sdpa bf16"]
    fig, axes = plt.subplots(1, len(records), figsize=(6 * len(records), 4), squeeze=False)
    for ax, r in zip(axes[0], records):
        names = [n for n in impls if n in r["gflops"]]
        ax.barh(names, [r["gflops"][n] for n in names], color=["C0" if "ours" in n else "C7" for n in names])
        for label, rate, style in (("matmul bf16", ceilings["bfloat16"], "--"),
                                   ("matmul fp32", ceilings["float32"], ":")):
            ax.axvline(rate, color="k", linestyle=style, label=f"{label} {rate:.0f}")
        ax.set_xlabel("GFLOP/s on the computed blocks")
        ax.set_title(f"B1 H8 N1024 D{r['config']['D']}, density {r['config']['density']:.2f}, block 64")
        ax.legend(loc="lower right", fontsize=8)
        ax.invert_yaxis()
    fig.tight_layout()
    common.save_figure_atomic(fig, path)
    plt.close(fig)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="D 32 only, no FlexAttention, 1024^3 ceilings, 3 reps")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 20; 5 quick)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--no-model", dest="model", action="store_false", help="skip the model step")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--plot", metavar="PATH", default=None, help="bar chart of GFLOP/s with the ceilings")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="results file (default bench_results/bf16-cpu.json)")


def main(args: argparse.Namespace) -> int:
    for name in ("reps", "warmup", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise SystemExit(f"--{name} must be >= {0 if name == 'warmup' else 1}, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    env = common.environment(device)
    reps = args.reps if args.reps is not None else 5 if args.quick else 20
    started = time.perf_counter()
    print(f"af2_ext bf16 benchmark: {env['cpu_model']} (cpu, threads={env['threads']}), torch {env['torch']}, "
          f"cpu_isa {ops.cpu_isa()} ({_bf16_path()})", flush=True)
    n = 1024 if args.quick else 2048
    ceilings = {name: matmul_gflops(common.DTYPES[name], n, 3 if args.quick else 10)
                for name in ("float32", "bfloat16")}
    records = run_attention(HEAD_DIMS[:1] if args.quick else HEAD_DIMS, reps=reps, warmup=args.warmup,
                            with_flex=not args.quick)
    model = model_step_ms(3) if args.model else None
    print(f"ceilings: dense matmul {n}^3 fp32 {ceilings['float32']:.0f} GFLOP/s, bf16 {ceilings['bfloat16']:.0f} "
          f"GFLOP/s")
    rows = []
    for r in records:
        for name, ms in r["ms"].items():
            ceiling = ceilings["bfloat16" if "bf16" in name else "float32"]
            rows.append([str(r["config"]["D"]), f"{r['config']['density']:.3f}", name, f"{ms:.3f}",
                         f"{r['gflops'][name]:.0f}", f"{100 * r['gflops'][name] / ceiling:.0f} %"])
    print(common.format_table(["D", "density", "impl", "ms", "GFLOP/s", "of matmul"], rows))
    for r in records:
        c = r["check"]
        print(f"check D {r['config']['D']}: ours bf16 max |err| vs fp32 reference {c['max_err']:.4g}, bf16 "
              f"reference's {c['bf16_reference_err']:.4g}: {'ok' if c['ok'] else 'FAIL'}")
        for note in r["notes"]:
            print(f"note: D {r['config']['D']}: {note}")
    if model is not None:
        print(f"model step (dim 256, depth 2, n 128, MSA 5 x 128): fp32 {model['fp32']:.0f} ms, bf16 autocast "
              f"{model['bf16 autocast']:.0f} ms")
    targets = evaluate_targets(records, model)
    print(common.format_targets("targets (issue 18, ratios within this run):", targets, value_spec=".2f"))
    if args.plot:
        common.say_plot(args.plot, plot(records, ceilings, args.plot))
    wall = round(time.perf_counter() - started, 1)
    doc = {"benchmark": "bf16", "environment": {**env, "cpu_isa": ops.cpu_isa()},
           "settings": {"reps": reps, "warmup": args.warmup, "quick": args.quick, "wall_s": wall,
                        "matmul_n": n},
           "ceilings_gflops": ceilings, "records": records, "model_ms": model, "targets": targets}
    path = args.json or os.path.join("bench_results", "bf16-cpu.json")
    common.write_json_atomic(path, doc)
    print(f"\nwrote {path} ({wall:.0f} s)")
    return 0
