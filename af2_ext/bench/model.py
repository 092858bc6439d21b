"""Whole-model benchmark: ``python -m af2_ext.bench model [--quick] [...]``.

One training step (forward and backward of a distogram cross-entropy) of :class:`af2_ext.Alphafold2` at the
seed README's size (dim 256, depth 2, heads 8, dim_head 64, sequence 128, MSA 5 x 64), timed against

- ``reference``: the same model and parameters with ``impl="reference"`` (pure PyTorch);
- ``seed``: alphafold2-pytorch 0.0.19 itself, when it is installed (``pip install alphafold2-pytorch==0.0.19``),
  with its default ``inter_msa_self_attn=True`` and with ``False``;
- ``floor``: ours with every attention op replaced by a free stand-in (returns its ``q``), i.e. only the
  embeddings, LayerNorms, linear projections, feed-forwards and head that every implementation of this
  architecture computes. Its time is a lower bound on any fp32 implementation's step on this device (even an
  underestimate: the key/value projections get no gradient), so ``seed / floor`` bounds the reachable speed-up.

Peak memory of a step: on CUDA ``max_memory_allocated`` above what was allocated before; on CPU the
resident-set increase of the step in a fresh child process (after a warmup step), as the other benchmarks.
``--quick`` measures only the seed's default ``inter_msa_self_attn=True``, with 3 timed steps.

The length scan (a fresh process per length and implementation, a memory budget, FLOPs and the matmul ceiling)
is ``python -m af2_ext.bench model_scan``: see :mod:`af2_ext.bench.model_scan`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from af2_ext.bench import common

IMPLS = ("ours", "reference", "seed", "floor")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    dim: int = 256
    depth: int = 2
    heads: int = 8
    dim_head: int = 64
    n: int = 128
    msa_rows: int = 5
    msa_cols: int = 64
    inter_msa_self_attn: bool = True
    reversible: bool = False
    cross_attn_compress_ratio: int = 1
    trunk: str = "seed"  # Alphafold2(trunk=...)
    pair_dim: Optional[int] = None  # the Evoformer's pair width


# --trunk evoformer: issue 17's size (c_m 64, c_z 128, depth 2, MSA 8 x n aligned to the sequence)
EVOFORMER = dict(dim=64, pair_dim=128, depth=2, heads=4, dim_head=32, msa_rows=8, trunk="evoformer")


def seed_available() -> Optional[str]:
    """None when alphafold2-pytorch imports, else why not."""
    try:
        import alphafold2_pytorch  # noqa: F401
    except Exception as error:  # noqa: BLE001  any import failure means "not available"
        return f"alphafold2-pytorch not importable ({type(error).__name__}: {error})"
    return None


def build(impl: str, config: ModelConfig, device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(dim=config.dim, depth=config.depth, heads=config.heads, dim_head=config.dim_head,
                  inter_msa_self_attn=config.inter_msa_self_attn, reversible=config.reversible,
                  cross_attn_compress_ratio=config.cross_attn_compress_ratio)
    if config.trunk != "seed":
        kwargs.update(trunk=config.trunk, pair_dim=config.pair_dim)
    if impl == "seed":
        from alphafold2_pytorch import Alphafold2 as SeedAlphafold2

        return SeedAlphafold2(**kwargs).to(device)
    from af2_ext import Alphafold2

    return Alphafold2(**kwargs, impl="reference" if impl == "reference" else "kernel").to(device)


class _FreeAttention:
    """Inside the block, ``ops.block_sparse_attention`` and ``ops.compressed_attention`` return ``q``."""

    def __enter__(self):
        from af2_ext import blocks

        self.saved = blocks.ops
        blocks.ops = type("FreeOps", (), {"block_sparse_attention": staticmethod(lambda q, *a, **k: q),
                                          "compressed_attention": staticmethod(lambda q, *a, **k: q)})
        return self

    def __exit__(self, *exc):
        from af2_ext import blocks

        blocks.ops = self.saved


def batch(config: ModelConfig, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 21, (1, config.n), generator=g)
    msa = torch.randint(0, 21, (1, config.msa_rows, config.msa_cols), generator=g)
    target = torch.randint(0, 37, (1, config.n, config.n), generator=g)
    out = dict(seq=seq, msa=msa, mask=torch.ones_like(seq).bool(), msa_mask=torch.ones_like(msa).bool(), target=target)
    return {k: v.to(device) for k, v in out.items()}


def step_fn(model: torch.nn.Module, data: dict, free_attention: bool = False) -> Callable[[], None]:
    inputs = {k: v for k, v in data.items() if k != "target"}

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(**inputs)
        F.cross_entropy(logits.reshape(-1, 37), data["target"].reshape(-1)).backward()

    if not free_attention:
        return step

    def floor_step():
        with _FreeAttention():
            step()

    return floor_step


_CHILD = "from af2_ext.bench.model import _memory_child_main; _memory_child_main()"


def _memory_child_main() -> None:
    payload = json.loads(sys.stdin.read())
    torch.set_num_threads(payload["threads"])
    config = ModelConfig(**payload["config"])
    device = torch.device("cpu")
    step = step_fn(build(payload["impl"], config, device), batch(config, device), payload["impl"] == "floor")
    print(json.dumps(common.child_peak_rss_mib(step, warmup=step)))


def measure(impl: str, config: ModelConfig, device: torch.device, *, reps: int, warmup: int, memory: bool) -> dict:
    result = {"impl": impl, "config": dataclasses.asdict(config), "step_ms": None, "peak_mib": None, "notes": []}
    if impl == "seed":
        why = seed_available()
        if why is not None:
            result["notes"].append(f"skipped: {why}")
            return result
    try:
        step = step_fn(build(impl, config, device), batch(config, device), impl == "floor")
        result["step_ms"] = common.time_ms(step, device, warmup=warmup, reps=reps, budget_s=60.0)
        if memory:
            if device.type == "cuda":
                result["peak_mib"] = common.cuda_peak_mib(step, device)
            else:
                payload = {"config": dataclasses.asdict(config), "impl": impl, "threads": torch.get_num_threads()}
                result["peak_mib"] = common.run_child(_CHILD, payload, threads=torch.get_num_threads(),
                                                      timeout_s=1800)["peak_mib"]
    except Exception as error:  # noqa: BLE001  recorded, never the end of the run
        result["notes"].append(f"failed: {common.reason(error)}")
    return result


def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="inter_msa_self_attn=True only (the seed's default), 3 timed steps")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--reps", type=int, default=None, help="timed steps, at most (default 5; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--reversible", action="store_true",
                        help="every model (ours, reference, seed, floor) with reversible=True")
    parser.add_argument("--n", type=int, default=ModelConfig.n, help="sequence length (default 128)")
    parser.add_argument("--trunk", choices=("seed", "evoformer"), default="seed",
                        help="evoformer: Alphafold2(trunk='evoformer') at c_m 64, c_z 128, depth 2, MSA 8 x n, "
                             "ours against the same blocks in pure PyTorch (impl='reference'); for lengths and "
                             "the longest within a budget, model_scan --trunk evoformer")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="results file (default bench_results/model-<device>.json)")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = common.environment(device)
    print(f"af2_ext model benchmark: {env['device_name']} ({device.type}, threads={env['threads']}), torch "
          f"{env['torch']}", flush=True)
    reps = args.reps if args.reps is not None else 3 if args.quick else 5
    if args.trunk == "evoformer":
        return _main_evoformer(args, device, env, reps)
    inter_msa = (True,) if args.quick else (True, False)
    started = time.perf_counter()
    results = []
    jobs = [(impl, ModelConfig(n=args.n, inter_msa_self_attn=inter, reversible=args.reversible))
            for inter in inter_msa for impl in IMPLS]
    for impl, config in common.progress(jobs, lambda j: f"{j[0]} inter_msa={j[1].inter_msa_self_attn}"):
        results.append(measure(impl, config, device, reps=reps, warmup=args.warmup, memory=args.memory))
    rows, targets = [], []
    for inter in inter_msa:
        get = {r["impl"]: r for r in results if r["config"]["inter_msa_self_attn"] == inter}
        ours, ref, seed, floor = get["ours"], get["reference"], get["seed"], get["floor"]
        speed = _ratio(seed["step_ms"], ours["step_ms"])
        mem = _ratio(ours["peak_mib"], seed["peak_mib"])
        bound = _ratio(seed["step_ms"], floor["step_ms"])
        rows.append([str(inter), common.fmt(ours["step_ms"], ".0f"), common.fmt(ref["step_ms"], ".0f"),
                     common.fmt(seed["step_ms"], ".0f"), common.fmt(floor["step_ms"], ".0f"),
                     common.fmt(_ratio(ref["step_ms"], ours["step_ms"]), ".2f"), common.fmt(speed, ".2f"),
                     common.fmt(bound, ".2f"), common.fmt(ours["peak_mib"], ".0f"), common.fmt(ref["peak_mib"], ".0f"),
                     common.fmt(seed["peak_mib"], ".0f"), common.fmt(floor["peak_mib"], ".0f"), common.fmt(mem, ".3f")])
        targets.append({"inter_msa_self_attn": inter, "speedup_vs_seed": speed, "memory_vs_seed": mem,
                        "speedup_bound": bound, "status": "n/a" if speed is None or mem is None else
                        "PASS" if speed >= 3 and mem <= 1 / 3 else "MISS"})
    print("step: median ms of forward+backward; x: time ratio over ours; seed/floor: the most any implementation "
          "of this architecture could gain over the seed here; MiB: peak increase of one step")
    print(common.format_table(["inter_msa", "ours ms", "ref ms", "seed ms", "floor ms", "x ref", "x seed",
                               "seed/floor", "ours MiB", "ref MiB", "seed MiB", "floor MiB", "mem/seed"], rows))
    for r in results:
        for note in r["notes"]:
            print(f"note: {r['impl']} inter_msa={r['config']['inter_msa_self_attn']}: {note}")
    print("targets (>= 3x faster and <= 1/3 the peak memory of alphafold2-pytorch 0.0.19):")
    for t in targets:
        print(f"  inter_msa_self_attn={t['inter_msa_self_attn']}: speed {common.fmt(t['speedup_vs_seed'])}x "
              f"(at most {common.fmt(t['speedup_bound'])}x reachable), memory "
              f"{common.fmt(t['memory_vs_seed'], '.3f')}  {t['status']}")
    wall = round(time.perf_counter() - started, 1)
    doc = {"benchmark": "model", "environment": env, "settings": {"reps": reps, "warmup": args.warmup,
           "memory": args.memory, "quick": args.quick, "device": device.type, "wall_s": wall},
           "results": results, "targets": targets}
    path = args.json or os.path.join("bench_results", f"model-{device.type}.json")
    common.write_json_atomic(path, doc)
    print(f"\nwrote {path} ({wall:.0f} s)")
    return 0


def _main_evoformer(args: argparse.Namespace, device: torch.device, env: dict, reps: int) -> int:
    """``--trunk evoformer``: ours and the pure-PyTorch reference, issue 17's target (>= 2x, <= 1/3 peak)."""
    started = time.perf_counter()
    config = ModelConfig(n=args.n, msa_cols=args.n, reversible=args.reversible, **EVOFORMER)
    results = [measure(impl, config, device, reps=reps, warmup=args.warmup, memory=args.memory)
               for impl in common.progress(["ours", "reference"], lambda impl: impl)]
    ours, ref = results
    speed, mem = _ratio(ref["step_ms"], ours["step_ms"]), _ratio(ours["peak_mib"], ref["peak_mib"])
    status = "n/a" if speed is None or mem is None else "PASS" if speed >= 2 and mem <= 1 / 3 else "MISS"
    print(f"Evoformer trunk: c_m {config.dim}, c_z {config.pair_dim}, depth {config.depth}, heads {config.heads} x "
          f"{config.dim_head}, MSA {config.msa_rows} x n, n {config.n}, reversible {config.reversible}")
    print(common.format_table(["impl", "step ms", "peak MiB"],
                              [[r["impl"], common.fmt(r["step_ms"], ".0f"), common.fmt(r["peak_mib"], ".0f")]
                               for r in results]))
    for r in results:
        for note in r["notes"]:
            print(f"note: {r['impl']}: {note}")
    targets = [{"speedup_vs_reference": speed, "memory_vs_reference": mem, "status": status}]
    print(f"target (>= 2x faster and <= 1/3 the peak memory of the pure-PyTorch blocks): speed "
          f"{common.fmt(speed)}x, memory {common.fmt(mem, '.3f')}  {status}")
    wall = round(time.perf_counter() - started, 1)
    doc = {"benchmark": "model", "environment": env, "settings": {"reps": reps, "warmup": args.warmup,
           "memory": args.memory, "quick": args.quick, "device": device.type, "trunk": "evoformer", "wall_s": wall},
           "results": results, "targets": targets}
    path = args.json or os.path.join("bench_results", f"model-evoformer-{device.type}.json")
    common.write_json_atomic(path, doc)
    print(f"\nwrote {path} ({wall:.0f} s)")
    return 0
