"""Length scan of the whole model: ``python -m af2_ext.bench model_scan [--lengths 64,128,192,256] [...]``.

For each sequence length n and each implementation, ONE FRESH PROCESS builds :class:`af2_ext.Alphafold2` (or the
seed's) at the seed README's width (dim 256, depth 2, heads 8, dim_head 64; ``--dim --depth --heads --dim-head``),
with an MSA aligned to the sequence (``--msa-rows`` 5 rows x n columns), batch 1, and runs one warm-up training
step (forward and backward of a distogram cross-entropy, as ``python -m af2_ext.bench model``) then ``--reps``
timed steps. It reports the step time (median, min) and memory:

- CPU: ``step_peak_mib``, the resident-set increase of a timed step over the RSS before it (the kernel's VmHWM,
  reset before each step, minus VmRSS; the child runs with a fixed glibc mmap threshold so freed tensors leave
  the RSS), and ``process_peak_mib``, the child's whole high-water mark (interpreter, torch, model, warm-up);
- CUDA: ``step_peak_mib``, ``torch.cuda.max_memory_allocated`` above what was allocated before the step, and
  ``device_peak_mib``, the most allocated at any time from the warm-up on (the model and inputs included).

Implementations (``--impls``, comma separated; default ``ours,ours-reversible,ours-sparse,reference,seed``): a base
``ours`` (af2_ext kernels), ``reference`` (``impl="reference"``, pure PyTorch; a reversible trunk runs through
ordinary autograd there), ``seed`` (alphafold2-pytorch 0.0.19) or ``floor`` (ours with every attention op replaced
by a free stand-in, see ``model``), with optional suffixes ``-reversible`` (``reversible=True``) and ``-sparse``
(``sparse_self_attn=True``: the seed's block-sparse layout for the axial and MSA self-attention).

The seed needs its own environment: ``--seed-python PATH`` runs its children with that interpreter (this file is
run there as a script, importing only the standard library, torch and alphafold2_pytorch). Without it the seed
runs here when alphafold2_pytorch imports; otherwise its rows say ``not available: <reason>``.

Memory budget ``--budget-gb G`` (GiB, default 8 on CPU): the parent polls each child's VmRSS every 50 ms and kills
it past the budget, reporting ``over budget`` with the highest RSS seen (a child whose own high-water mark ended
above the budget counts as over budget too). On CUDA the budget (default: the GPU's memory) is the child's
``torch.cuda.set_per_process_memory_fraction``, and an out-of-memory error is ``over budget``. A child running
past ``--timeout`` seconds (default 600) is killed: ``timeout``. Once an implementation is over budget, timed out
or failed at some n, its longer lengths are skipped. Per implementation the report gives the longest length that
trains within the budget (the largest scanned n that completed).

FLOPs: :func:`model_flops` counts the matmuls of a step explicitly (embeddings, LayerNorms, softmax and elementwise
work excluded; backward = 2 x forward less the last layer's MSA updates, which never reach the logits; a
recomputing reversible trunk one more trunk forward; sparse attention on its computed pairs only). A child timing
``torch.mm`` of ``--ceiling-size`` square fp32 matrices with the same thread count gives the dense matmul rate of
this machine in the same run: each row's GFLOP/s is set beside it (``of mm``).

Out: a markdown table, JSON (``--json``, default ``bench_results/model_scan-<device>.json``, written atomically;
schema in :func:`main`), and with ``--plot PATH`` (matplotlib) step time and peak RSS against n, log y.

When ``--max-seq-len`` is not given each length runs with ``max_seq_len = max(2048, n, msa_rows * n)`` (the
seed's 2048 until the whole-MSA sparse attention needs more; the sparse layout's random blocks follow it).

Threads: ``--threads`` per child (default torch's here), ``OMP_NUM_THREADS`` set to match; the children inherit
the rest of the environment (recorded in the JSON's ``settings.child_env``). On a shared machine whose cores are
busy, OpenMP's default spinning barriers can slow a multi-threaded step many-fold (seen: 2.9 s vs 0.08 s a step
at dim 64, n 32, 2 threads on 2 loaded cores); ``OMP_WAIT_POLICY=PASSIVE`` or ``--threads 1`` avoid that.

This module's top level imports only the standard library and torch: the children run it as a script
(:data:`_CHILD_CODE`), the seed's in an interpreter without af2_ext.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch

DEFAULT_LENGTHS = (64, 128, 192, 256)
DEFAULT_IMPLS = ("ours", "ours-reversible", "ours-sparse", "reference", "seed")
BASES = ("ours", "reference", "seed", "floor")
DISTOGRAM_BUCKETS = 37
FF_MULT = 4  # GEGLU: proj_in dim -> 2 * 4 * dim, proj_out 4 * dim -> dim
FF_CHUNK = 4096  # af2_ext.model.FF_CHUNK_SIZE (a literal: the seed's child cannot import af2_ext; tested equal)
SPARSE_BLOCK = 16  # the seed's sparse block size (Alphafold2's sparse_block_size default)
RESULT_MARK = "MODEL_SCAN_RESULT "
POLL_S = 0.05
_MIB = 2**20
_GIB = 2**30

# Children: ``python -c _CHILD_CODE THIS_FILE PAYLOAD`` runs this file under the name below (sys.path[0] is then
# the working directory, not af2_ext/bench, whose module names must not shadow top-level ones).
_CHILD_NAME = "__model_scan_child__"
_CHILD_CODE = f"import runpy, sys; runpy.run_path(sys.argv[1], run_name={_CHILD_NAME!r})"


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """The model and data of one scan (the length varies)."""
    dim: int = 256
    depth: int = 2
    heads: int = 8
    dim_head: int = 64
    msa_rows: int = 5
    inter_msa_self_attn: bool = True
    cross_attn_compress_ratio: int = 1
    max_seq_len: Optional[int] = None  # None: max(2048, n, msa_rows * n)
    trunk: str = "seed"  # Alphafold2(trunk=...): "seed" or "evoformer"
    pair_dim: Optional[int] = None  # the Evoformer's pair width (None: dim)

    def seq_len_limit(self, n: int) -> int:
        return self.max_seq_len if self.max_seq_len is not None else max(2048, n, self.msa_rows * n)


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    base: str
    reversible: bool = False
    sparse: bool = False
    ffwhole: bool = False  # ff_chunk_size=None: feed-forwards over all tokens at once (the seed's way)

    @property
    def recomputes(self) -> bool:
        """Whether the reversible trunk recomputes its forward in the backward (the reference uses autograd)."""
        return self.reversible and self.base != "reference"


def parse_impl(name: str) -> Impl:
    """``base[-reversible][-sparse][-ffwhole]`` with base in :data:`BASES` (``-ffwhole``: af2_ext with
    ``ff_chunk_size=None``, feed-forwards over all tokens at once instead of the default chunks of 4096 tokens
    recomputed in the backward; ours and floor only)."""
    parts = name.strip().split("-")
    base, flags = parts[0], parts[1:]
    if (base not in BASES or any(f not in ("reversible", "sparse", "ffwhole") for f in flags)
            or len(set(flags)) != len(flags) or ("ffwhole" in flags and base not in ("ours", "floor"))):
        raise ValueError(f"unknown implementation {name!r}: expected one of {', '.join(BASES)} with optional "
                         "suffixes -reversible and -sparse (and -ffwhole for ours), e.g. ours-reversible")
    return Impl(name.strip(), base, "reversible" in flags, "sparse" in flags, "ffwhole" in flags)


# ----------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------


def sparse_density(seq_len: int, *, heads: int, max_seq_len: int, block_size: int = SPARSE_BLOCK,
                   layout_seed: int = 0) -> float:
    """Fraction of the seq_len x seq_len (query, key) pairs the model's sparse layout computes, averaged over
    heads: the seed's layout for ``max_seq_len`` cut to the blocks of ``seq_len`` (as
    :class:`af2_ext.Alphafold2` builds it), a partial last block counting its actual rows and columns."""
    from af2_ext import layouts

    nb = layouts.num_blocks(seq_len, block_size)
    layout = layouts.seed_default(max_seq_len, block_size=block_size, num_heads=heads, seed=layout_seed)[:, :nb, :nb]
    sizes = torch.full((nb,), float(block_size), dtype=torch.float64)
    sizes[-1] = seq_len - (nb - 1) * block_size
    pairs = torch.einsum("hij,i,j->", layout.to(torch.float64), sizes, sizes).item()
    return pairs / (layout.shape[0] * seq_len * seq_len)


def model_flops(config: ScanConfig, n: int, *, msa_rows: Optional[int] = None, msa_cols: Optional[int] = None,
                reversible: bool = False, recompute: Optional[bool] = None, sparse: bool = False,
                axial_density: Optional[float] = None, msa_density: Optional[float] = None,
                attention: bool = True, ff_chunk: Optional[int] = None) -> dict:
    """Matmul FLOPs (2 per multiply-add) of one training step of Alphafold2, batch 1, sequence n, MSA
    ``msa_rows x msa_cols`` (default ``config.msa_rows x n``).

    Forward, per layer (P = n*n pair tokens, S = rows*cols MSA tokens, I = heads*dim_head, d = dim):

    - axial attention on the pair: rows and columns each a qkv projection (2*P*d*3I), QK^T and PV over n
      sequences of n (2 x 2*n*n*n*I), an output projection (2*P*I*d);
    - MSA self-attention: qkv and output projections over S tokens; QK^T and PV across the whole MSA (S x S)
      with ``inter_msa_self_attn``, else within each row (rows x cols x cols);
    - cross-attention pair -> MSA: q over P, kv over S, the grouped Conv1d compression of k and v when the ratio
      r > 1 (2 x 2*I*dim_head*r per compressed position, ceil(S/r) positions), QK^T and PV (P x ceil(S/r)),
      the output projection; MSA -> pair the same with P and S swapped;
    - GEGLU feed-forwards, 2*T*d*8d + 2*T*4d*d over T tokens: one on the pair and one on the MSA (the sequential
      layer), two on each in the reversible layer (its eight couplings: axial, ff x, msa attn, ff m, cross,
      ff x, msa cross, ff m);

    and the head, 2*P*d*37. Sparse (``sparse``): the axial and MSA self-attention QK^T and PV on the computed
    pairs only (``axial_density``, ``msa_density``: the fractions computed, by default from
    :func:`sparse_density`). ``attention=False``: the ``floor`` (QK^T, PV and the compression free).

    Backward: 2 x forward (each product's two gradients), less the last layer's MSA -> pair cross-attention and
    last MSA feed-forward, whose outputs never reach the logits (autograd skips them; a recomputing reversible
    backward computes them too).

    ``ff_chunk``: the feed-forwards' chunk (``Alphafold2(ff_chunk_size=...)``); a stream with more tokens runs
    its feed-forwards chunked, each chunk recomputed in the backward: one more feed-forward forward per step.

    Returns ``forward``, ``backward``, ``recompute`` (the trunk's forward once more when a
    reversible trunk recomputes, by default when ``reversible``; plus the chunked feed-forwards' forward),
    ``total`` and ``parts`` (forward, per kind).
    """
    d, h, dh = config.dim, config.heads, config.dim_head
    inner = h * dh
    rows = config.msa_rows if msa_rows is None else msa_rows
    cols = n if msa_cols is None else msa_cols
    pair, msa = n * n, rows * cols
    r = config.cross_attn_compress_ratio
    recompute = reversible if recompute is None else recompute
    if sparse:
        limit = config.seq_len_limit(n)
        if axial_density is None:
            axial_density = sparse_density(n, heads=h, max_seq_len=limit)
        if msa_density is None:
            msa_len = msa if config.inter_msa_self_attn else cols
            msa_density = sparse_density(msa_len, heads=h, max_seq_len=limit)
    axial_density = 1.0 if not sparse or axial_density is None else axial_density
    msa_density = 1.0 if not sparse or msa_density is None else msa_density
    core = 1.0 if attention else 0.0

    def linear(tokens: int, fan_in: int, fan_out: int) -> float:
        return 2.0 * tokens * fan_in * fan_out

    def attn(queries: int, keys: int) -> float:  # QK^T and PV over all heads
        return core * 2 * 2.0 * queries * keys * inner

    def compress(context: int) -> float:  # grouped Conv1d of k and v
        return 0.0 if r == 1 else core * 2 * 2.0 * inner * dh * r * math.ceil(context / r)

    ff_per_stream = 2 if reversible else 1
    msa_attn = attn(msa, msa) if config.inter_msa_self_attn else rows * attn(cols, cols)
    layer = {
        "axial_proj": 2 * (linear(pair, d, 3 * inner) + linear(pair, inner, d)),
        "axial_attn": 2 * n * attn(n, n) * axial_density,
        "msa_proj": linear(msa, d, 3 * inner) + linear(msa, inner, d),
        "msa_attn": msa_attn * msa_density,
        "cross_proj": linear(pair, d, inner) + linear(msa, d, 2 * inner) + linear(pair, inner, d),
        "cross_attn": attn(pair, math.ceil(msa / r)) + compress(msa),
        "msa_cross_proj": linear(msa, d, inner) + linear(pair, d, 2 * inner) + linear(msa, inner, d),
        "msa_cross_attn": attn(msa, math.ceil(pair / r)) + compress(pair),
        "ff_pair": ff_per_stream * (linear(pair, d, 2 * FF_MULT * d) + linear(pair, FF_MULT * d, d)),
        "ff_msa": ff_per_stream * (linear(msa, d, 2 * FF_MULT * d) + linear(msa, FF_MULT * d, d)),
    }
    parts = {k: v * config.depth for k, v in layer.items()}
    parts["head"] = linear(pair, d, DISTOGRAM_BUCKETS)
    forward = sum(parts.values())
    trunk = forward - parts["head"]
    # The last layer's MSA -> pair cross-attention and its last MSA feed-forward never reach the logits: autograd
    # skips their backward, the recomputing reversible backward does not (it runs every coupling's vjp).
    dead = 0.0 if recompute else layer["msa_cross_proj"] + layer["msa_cross_attn"] + layer["ff_msa"] / ff_per_stream
    ff_again = 0.0
    if ff_chunk is not None:
        ff_again = sum(parts[k] for k, tokens in (("ff_pair", pair), ("ff_msa", msa)) if tokens > ff_chunk)
    out = {"forward": forward, "backward": 2 * (forward - dead),
           "recompute": (trunk if recompute else 0.0) + ff_again}
    out["total"] = out["forward"] + out["backward"] + out["recompute"]
    out["parts"] = parts
    out["axial_density"], out["msa_density"] = axial_density, msa_density
    return out


def impl_flops(config: ScanConfig, impl: Impl, n: int) -> dict:
    chunked = impl.base in ("ours", "floor") and not impl.ffwhole  # af2_ext's default ff_chunk_size
    if config.trunk == "evoformer":
        from af2_ext.bench.evoformer_flops import evoformer_flops  # the parent only: children import no af2_ext

        return evoformer_flops(n=n, msa_rows=config.msa_rows, c_m=config.dim, c_z=config.pair_dim or config.dim,
                               heads=config.heads, dim_head=config.dim_head, depth=config.depth,
                               reversible=impl.reversible, recompute=impl.recomputes,
                               attention=impl.base != "floor", chunked=impl.base != "seed" and not impl.ffwhole)
    return model_flops(config, n, reversible=impl.reversible, recompute=impl.recomputes, sparse=impl.sparse,
                       attention=impl.base != "floor", ff_chunk=FF_CHUNK if chunked else None)


# ----------------------------------------------------------------------------------------------------------
# The child (standard library and torch only at the top level: it also runs in the seed's interpreter)
# ----------------------------------------------------------------------------------------------------------


# _status_kib and _reset_hwm repeat af2_ext.bench.common's /proc readers on purpose: this child runs in the
# seed's interpreter too, where af2_ext may not be importable.
def _status_kib(field: str, pid: str = "self") -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def make_batch(n: int, msa_rows: int, device: torch.device, seed: int = 0) -> dict:
    """The step's data: the same draws as :func:`af2_ext.bench.model.batch` with ``msa_cols = n``."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 21, (1, n), generator=g)
    msa = torch.randint(0, 21, (1, msa_rows, n), generator=g)
    target = torch.randint(0, DISTOGRAM_BUCKETS, (1, n, n), generator=g)
    out = dict(seq=seq, msa=msa, mask=torch.ones_like(seq).bool(), msa_mask=torch.ones_like(msa).bool(), target=target)
    return {k: v.to(device) for k, v in out.items()}


def _build_model(p: dict, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    """(model, context manager factory around a step) for the payload ``p``."""
    import contextlib

    torch.manual_seed(0)
    kwargs = dict(dim=p["dim"], depth=p["depth"], heads=p["heads"], dim_head=p["dim_head"],
                  max_seq_len=p["max_seq_len"], inter_msa_self_attn=p["inter_msa_self_attn"],
                  reversible=p["reversible"], cross_attn_compress_ratio=p["cross_attn_compress_ratio"])
    if p["sparse"]:
        kwargs["sparse_self_attn"] = True
    if p.get("ffwhole"):
        kwargs["ff_chunk_size"] = None
    if p.get("trunk", "seed") != "seed":
        kwargs.update(trunk=p["trunk"], pair_dim=p.get("pair_dim"))
    around = contextlib.nullcontext
    if p["base"] == "seed":
        from alphafold2_pytorch import Alphafold2 as SeedAlphafold2

        return SeedAlphafold2(**kwargs).to(device), around
    from af2_ext import Alphafold2

    model = Alphafold2(**kwargs, impl="reference" if p["base"] == "reference" else "kernel").to(device)
    if p["base"] == "floor":
        from af2_ext.bench.model import _FreeAttention as around
    return model, around


def _child_step(p: dict) -> dict:
    import torch.nn.functional as F

    torch.set_num_threads(p["threads"])
    device = torch.device(p["device"])
    out = {"pid": os.getpid(), "python": sys.executable, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        out["device_memory_mib"] = total / _MIB
        if p.get("budget_bytes"):
            torch.cuda.set_per_process_memory_fraction(min(1.0, p["budget_bytes"] / total), device)
    model, around = _build_model(p, device)
    data = make_batch(p["n"], p["msa_rows"], device)
    inputs = {k: v for k, v in data.items() if k != "target"}

    def step():
        with around():
            model.zero_grad(set_to_none=True)
            logits = model(**inputs)
            F.cross_entropy(logits.reshape(-1, DISTOGRAM_BUCKETS), data["target"].reshape(-1)).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out["model_rss_mib"] = (_status_kib("VmRSS") or 0) / 1024
    try:
        for _ in range(p["warmup"]):
            step()
        times, peaks = [], []
        hwm = _reset_hwm() and device.type == "cpu"
        out["process_peak_mib"] = (_status_kib("VmHWM") or 0) / 1024  # through the warm-up
        if device.type == "cuda":
            out["device_peak_mib"] = torch.cuda.max_memory_allocated(device) / _MIB
        for _ in range(max(p["reps"], 1)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            else:
                _reset_hwm()
                before = _status_kib("VmRSS")
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
            if device.type == "cuda":
                peaks.append((torch.cuda.max_memory_allocated(device) - before) / _MIB)
                out["device_peak_mib"] = max(out["device_peak_mib"], torch.cuda.max_memory_allocated(device) / _MIB)
            elif hwm and before is not None:
                peak = _status_kib("VmHWM") or 0
                peaks.append(max(peak - before, 0) / 1024)
            out["process_peak_mib"] = max(out["process_peak_mib"], (_status_kib("VmHWM") or 0) / 1024)
    except torch.cuda.OutOfMemoryError as error:
        out.update(status="over budget", reason=f"CUDA out of memory: {str(error).splitlines()[0][:200]}")
        return out
    out.update(status="ok", times_ms=times, step_ms=statistics.median(times), step_ms_min=min(times),
               step_peak_mib=max(peaks) if peaks else None,
               memory_method="cuda max_memory_allocated - allocated before the step" if device.type == "cuda" else
               "VmHWM - VmRSS around each timed step (max)" if peaks else None)
    return out


def _child_matmul(p: dict) -> dict:
    """Dense fp32 ``torch.mm`` of two size x size matrices: the machine's matmul ceiling."""
    torch.set_num_threads(p["threads"])
    device = torch.device(p["device"])
    size = p["size"]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device)
    b = torch.randn(size, size, generator=g).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        torch.mm(a, b)
    sync()
    times, spent = [], 0.0
    while len(times) < p["reps"] and (spent < 10.0 or len(times) < 3):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        elapsed = time.perf_counter() - t0
        times.append(elapsed * 1e3)
        spent += elapsed
    flops = 2.0 * size**3
    median = statistics.median(times)
    return {"status": "ok", "pid": os.getpid(), "size": size, "threads": torch.get_num_threads(), "ms": median,
            "ms_min": min(times), "gflops": flops / median / 1e6, "best_gflops": flops / min(times) / 1e6}


def _child_main(argv: Sequence[str]) -> int:
    p = json.loads(argv[0])
    if p.get("check_import"):
        import alphafold2_pytorch  # noqa: F401

        out = {"status": "ok", "pid": os.getpid()}
    else:
        out = _child_matmul(p) if p["base"] == "matmul" else _child_step(p)
    print(RESULT_MARK + json.dumps(out), flush=True)
    return 0


if __name__ == _CHILD_NAME:
    sys.exit(_child_main(sys.argv[2:]))


# ----------------------------------------------------------------------------------------------------------
# The parent
# ----------------------------------------------------------------------------------------------------------


def run_child(python: str, payload: dict, *, threads: int, budget_bytes: Optional[int], timeout_s: float,
              poll_s: float = POLL_S, malloc: str = "unmapped") -> dict:
    """Run this file's child mode with ``python`` on ``payload``; poll its VmRSS, kill it past ``budget_bytes``
    (``over budget``) or ``timeout_s`` (``timeout``). Returns the child's record (status ``ok`` ...) with
    ``rss_max_seen_mib`` (the parent's view) and ``wall_s``; a child that exits without a record is ``failed``.
    ``malloc="unmapped"``: a fixed glibc mmap threshold (every large tensor its own mmap, unmapped on free: the
    RSS is the live tensors, each allocation pays its page faults); ``"default"``: the allocator as users run it
    (freed memory reused, steps faster, RSS includes what glibc keeps)."""
    env = dict(os.environ)
    if malloc == "unmapped":
        # A fixed threshold turns off glibc's dynamic one: every large tensor is its own mmap, unmapped on free.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    elif malloc != "default":
        raise ValueError(f"malloc must be 'unmapped' or 'default', got {malloc!r}")
    env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen([python, "-c", _CHILD_CODE, os.path.abspath(__file__), json.dumps(payload)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        rss_max, killed = 0, None
        while proc.poll() is None:
            rss = _status_kib("VmRSS", str(proc.pid))
            if rss is not None:
                rss_max = max(rss_max, rss)
            if budget_bytes is not None and rss is not None and rss * 1024 > budget_bytes:
                killed = "over budget"
            elif time.perf_counter() - started > timeout_s:
                killed = "timeout"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(poll_s)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    record = None
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            record = json.loads(line[len(RESULT_MARK):])
            break
    seen = {"rss_max_seen_mib": rss_max / 1024 if rss_max else None, "wall_s": round(wall, 2)}
    if killed == "over budget":
        return {"status": "over budget", "reason": f"RSS {rss_max / 1024:.0f} MiB > budget "
                f"{budget_bytes / _MIB:.0f} MiB, killed", **seen}
    if killed == "timeout":
        return {"status": "timeout", "reason": f"still running after {timeout_s:g} s, killed", **seen}
    if record is None:
        lines = stderr.strip().splitlines() or ["no output"]
        code = proc.returncode
        why = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
        if code == -signal.SIGKILL:
            why += " (out of memory?)"
        return {"status": "failed", "reason": f"child {why}: {lines[-1][:300]}", **seen}
    record.update(seen)
    if (record.get("status") == "ok" and budget_bytes is not None and record.get("process_peak_mib")
            and record["process_peak_mib"] * _MIB > budget_bytes and payload.get("device", "cpu") == "cpu"):
        record["status"] = "over budget"
        record["reason"] = (f"process peak {record['process_peak_mib']:.0f} MiB > budget "
                            f"{budget_bytes / _MIB:.0f} MiB (between two polls)")
    return record


def seed_python_check(python: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(interpreter for the seed's children, None) or (None, why the seed is not available)."""
    if python is None:
        try:
            import alphafold2_pytorch  # noqa: F401
        except Exception as error:  # noqa: BLE001  any import failure means "not available"
            return None, f"alphafold2-pytorch not importable here ({type(error).__name__}: {error}); " \
                         "pass --seed-python PATH"
        return sys.executable, None
    if not os.path.exists(python):
        return None, f"--seed-python {python}: no such file"
    result = run_child(python, {"check_import": True}, threads=1, budget_bytes=None, timeout_s=300)
    if result.get("status") != "ok":
        return None, f"alphafold2-pytorch not importable with {python} ({result.get('reason', result['status'])})"
    return python, None


def scan(config: ScanConfig, lengths: Sequence[int], impls: Sequence[Impl], *, reps: int, warmup: int,
         device: str, threads: int, budget_bytes: Optional[int], timeout_s: float,
         seed_python: Optional[str] = None, runner: Callable[..., dict] = run_child,
         progress: Callable = lambda items, describe: items) -> list[dict]:
    """One record per (n, impl), lengths ascending; see :func:`main` for the fields."""
    seed_exe, seed_why = (None, None)
    if any(i.base == "seed" for i in impls):
        seed_exe, seed_why = seed_python_check(seed_python)
    stopped: dict = {}
    records = []
    jobs = [(n, impl) for n in sorted(lengths) for impl in impls]
    for n, impl in progress(jobs, lambda job: f"n={job[0]} {job[1].name}"):
        record = {"impl": impl.name, "n": n, "msa_rows": config.msa_rows, "msa_cols": n,
                  "max_seq_len": config.seq_len_limit(n), "status": None, "reason": None,
                  "flops": impl_flops(config, impl, n)}
        if impl.base == "seed" and config.trunk != "seed":
            record.update(status="not available", reason=f"not available: the seed has no {config.trunk} trunk")
        elif impl.base == "seed" and seed_exe is None:
            record.update(status="not available", reason=f"not available: {seed_why}")
        elif impl.name in stopped:
            record.update(status="skipped", reason=f"skipped: {stopped[impl.name]}")
        else:
            payload = {"base": impl.base, "reversible": impl.reversible, "sparse": impl.sparse,
                       "ffwhole": impl.ffwhole, "n": n,
                       "msa_rows": config.msa_rows, "dim": config.dim, "depth": config.depth, "heads": config.heads,
                       "dim_head": config.dim_head, "inter_msa_self_attn": config.inter_msa_self_attn,
                       "cross_attn_compress_ratio": config.cross_attn_compress_ratio,
                       "trunk": config.trunk, "pair_dim": config.pair_dim,
                       "max_seq_len": config.seq_len_limit(n), "reps": reps, "warmup": warmup, "threads": threads,
                       "device": device, "budget_bytes": budget_bytes}
            python = seed_exe if impl.base == "seed" else sys.executable
            child = runner(python, payload, threads=threads, budget_bytes=None if device == "cuda" else budget_bytes,
                           timeout_s=timeout_s)
            record.update(child)
            if record["status"] != "ok":
                stopped[impl.name] = f"{record['status']} at n={n}"
        records.append(record)
    return records


def summarise(records: Sequence[dict], ceiling: Optional[dict]) -> None:
    """Adds ``gflops_per_s``, ``ceiling_fraction``, ``x_reference``, ``x_seed`` and ``peak_vs_seed`` to the
    completed records in place."""
    ok = {(r["n"], r["impl"]): r for r in records if r["status"] == "ok"}
    rate = ceiling.get("gflops") if ceiling and ceiling.get("status") == "ok" else None
    for r in records:
        if r["status"] != "ok":
            continue
        r["gflops_per_s"] = r["flops"]["total"] / r["step_ms"] / 1e6
        r["ceiling_fraction"] = r["gflops_per_s"] / rate if rate else None
        for key, other in (("x_reference", "reference"), ("x_seed", "seed")):
            o = ok.get((r["n"], other))
            r[key] = o["step_ms"] / r["step_ms"] if o else None
        seed = ok.get((r["n"], "seed"))
        r["peak_vs_seed"] = _peak_mib(r) / _peak_mib(seed) if seed and _peak_mib(seed) and _peak_mib(r) else None


def longest(records: Sequence[dict], impls: Sequence[Impl]) -> dict:
    """impl -> the largest n that completed (None if none did)."""
    out = {}
    for impl in impls:
        done = [r["n"] for r in records if r["impl"] == impl.name and r["status"] == "ok"]
        out[impl.name] = max(done) if done else None
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(records: Sequence[dict], impls: Sequence[Impl], ceiling: Optional[dict], budget_bytes: Optional[int],
           device: str) -> str:
    peak_name = "process peak MiB" if device == "cpu" else "GPU peak MiB"
    header = ["n", "impl", "status", "step s (median)", "min s", "step peak MiB", peak_name, "GFLOP/step", "GFLOP/s",
              "of mm", "x ref", "x seed", "peak/seed"]
    rows = []
    for r in records:
        ok = r["status"] == "ok"
        peak = _peak_mib(r) if ok else r.get("rss_max_seen_mib") if device == "cpu" else None
        rows.append([str(r["n"]), r["impl"], r["status"],
                     _fmt(r.get("step_ms") and r["step_ms"] / 1e3, ".2f"),
                     _fmt(r.get("step_ms_min") and r["step_ms_min"] / 1e3, ".2f"),
                     _fmt(r.get("step_peak_mib"), ".0f"),
                     _fmt(peak, ".0f") + ("" if ok or peak is None else " (seen)"),
                     _fmt(r["flops"]["total"] / 1e9, ".1f"), _fmt(r.get("gflops_per_s"), ".1f"),
                     _fmt(r.get("ceiling_fraction") and 100 * r["ceiling_fraction"], ".0f") +
                     ("%" if r.get("ceiling_fraction") else ""),
                     _fmt(r.get("x_reference"), ".2f"), _fmt(r.get("x_seed"), ".2f"),
                     _fmt(r.get("peak_vs_seed"), ".2f")])
    lines = [markdown_table(header, rows), ""]
    if ceiling and ceiling.get("status") == "ok":
        lines.append(f"dense fp32 matmul ceiling: torch.mm {ceiling['size']}x{ceiling['size']}, "
                     f"{ceiling['gflops']:.1f} GFLOP/s median ({ceiling['best_gflops']:.1f} best), "
                     f"{ceiling['threads']} threads")
    elif ceiling:
        lines.append(f"dense fp32 matmul ceiling: {ceiling.get('status')}: {ceiling.get('reason')}")
    budget = "the GPU's memory" if budget_bytes is None else f"{budget_bytes / _GIB:g} GiB"
    lines.append(f"longest length that trains within the budget ({budget}):")
    for name, n in longest(records, impls).items():
        why = next((r["reason"] for r in records if r["impl"] == name and r["status"] not in ("ok", "skipped")), None)
        lines.append(f"  {name}: {'none' if n is None else n}" + (f"  ({why})" if why else ""))
    lines.append("step: forward + backward after one warm-up step; step peak: the RSS increase of a timed step; "
                 "process peak: the child's high-water mark (or the highest RSS seen before it was stopped; on CUDA "
                 "the GPU's peak allocated); "
                 "of mm: GFLOP/s over the matmul ceiling; x ref / x seed: their step time over this one's; "
                 "peak/seed: the peak over the seed's")
    return "\n".join(lines)


def _peak_mib(record: dict) -> Optional[float]:
    """The whole run's peak: the GPU's (CUDA) or the child's RSS high-water mark (CPU)."""
    return record.get("device_peak_mib", record.get("process_peak_mib"))


def plot(records: Sequence[dict], impls: Sequence[Impl], budget_bytes: Optional[int], path: str) -> bool:
    from af2_ext.bench import common

    plt = common.pyplot()
    if plt is None:
        return False
    cuda = any("device_peak_mib" in r for r in records)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for impl in impls:
        mine = [r for r in records if r["impl"] == impl.name]
        done = [r for r in mine if r["status"] == "ok"]
        stopped = [r for r in mine if r["status"] in ("over budget", "timeout")]
        if not done and not stopped:
            continue
        ns = [r["n"] for r in done]
        color = axes[0].plot(ns, [r["step_ms"] / 1e3 for r in done], marker="o", label=impl.name)[0].get_color()
        axes[1].plot(ns, [_peak_mib(r) / 1024 for r in done], marker="o", color=color, label=impl.name)
        steps = [(r["n"], r["step_peak_mib"] / 1024) for r in done if r.get("step_peak_mib")]
        if steps:
            axes[2].plot(*zip(*steps), marker="o", color=color, label=impl.name)
        for r in stopped:
            seen = r.get("rss_max_seen_mib") if not cuda else None
            y = seen / 1024 if seen else (budget_bytes / _GIB if budget_bytes else None)
            if y is None:
                continue
            axes[1].plot([r["n"]], [y], marker="x", markersize=10, linestyle="", color=color)
            axes[1].annotate(r["status"], (r["n"], y), fontsize=7, textcoords="offset points", xytext=(4, 4))
    if budget_bytes is not None:
        axes[1].axhline(budget_bytes / _GIB, color="grey", linestyle="--", label="budget")
    axes[0].set_title("training step (s)")
    axes[1].set_title(("GPU peak allocated" if cuda else "process peak RSS") + " (GiB); x: stopped")
    axes[2].set_title("peak increase of a step (GiB)")
    for ax in axes:
        ax.set_xlabel("sequence length n")
        ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure_atomic(fig, path)
    plt.close(fig)
    return True


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _impl_list(text: str) -> list[Impl]:
    try:
        impls = [parse_impl(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not impls or len({i.name for i in impls}) != len(impls):
        raise argparse.ArgumentTypeError(f"expected distinct implementations, got {text!r}")
    return impls


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=_int_list, default=list(DEFAULT_LENGTHS),
                        help="sequence lengths, comma separated (default 64,128,192,256)")
    parser.add_argument("--impls", type=_impl_list, default=[parse_impl(i) for i in DEFAULT_IMPLS],
                        help="implementations, comma separated: ours|reference|seed|floor with optional -reversible "
                             "and -sparse (default ours,ours-reversible,ours-sparse,reference,seed)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per child (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--dim", type=int, default=ScanConfig.dim, help="model width (default 256)")
    parser.add_argument("--depth", type=int, default=ScanConfig.depth, help="layers (default 2)")
    parser.add_argument("--heads", type=int, default=ScanConfig.heads, help="attention heads (default 8)")
    parser.add_argument("--dim-head", type=int, default=ScanConfig.dim_head, help="head width (default 64)")
    parser.add_argument("--msa-rows", type=int, default=ScanConfig.msa_rows, help="MSA rows of n columns (default 5)")
    parser.add_argument("--msa-row-attn", action="store_true",
                        help="inter_msa_self_attn=False (attention within each MSA row; default across the MSA)")
    parser.add_argument("--compress-ratio", type=int, default=1, help="cross_attn_compress_ratio (default 1)")
    parser.add_argument("--trunk", choices=("seed", "evoformer"), default="seed",
                        help="Alphafold2(trunk=...): the seed's layers (default) or AlphaFold2's Evoformer blocks "
                             "(MSA width --dim, pair width --pair-dim; 'reference' is then the same blocks in pure "
                             "PyTorch, math attention)")
    parser.add_argument("--pair-dim", type=int, default=None, help="the Evoformer's pair width (default --dim)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="the model's max_seq_len (default max(2048, n, msa_rows * n) per length)")
    parser.add_argument("--budget-gb", type=float, default=None,
                        help="memory budget per child in GiB (default 8 on CPU, the GPU's memory on CUDA)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per child (default 600)")
    parser.add_argument("--seed-python", metavar="PATH", default=None,
                        help="a Python with alphafold2-pytorch 0.0.19 installed, for the seed's children")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="threads per child (default: torch's here)")
    parser.add_argument("--malloc", choices=("unmapped", "default"), default="unmapped",
                        help="children's glibc allocator: 'unmapped' (fixed mmap threshold: RSS = live tensors; "
                             "default) or 'default' (as users run it: faster steps, RSS includes what glibc keeps)")
    parser.add_argument("--ceiling-size", type=int, default=2048,
                        help="square size of the torch.mm ceiling (default 2048; 0 skips it)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="results file (default bench_results/model_scan-<device>.json)")
    parser.add_argument("--plot", metavar="PATH", default=None, help="plot (needs matplotlib)")


def main(args: argparse.Namespace) -> int:
    """JSON written: ``{"benchmark": "model_scan", "environment": {...}, "settings": {lengths, impls, reps, warmup,
    config: ScanConfig fields, device, threads, budget_gib, budget_bytes, timeout_s, seed_python, wall_s, child_env},
    "ceiling": {status, size, threads, ms, ms_min, gflops, best_gflops, pid} (or status/reason),
    "results": [one per (n, impl): impl, n, msa_rows, msa_cols, max_seq_len, status ("ok" | "over budget" |
    "timeout" | "failed" | "skipped" | "not available"), reason, flops {forward, backward, recompute, total, parts,
    axial_density, msa_density}, and from the child when it ran: pid, python, torch, threads, wall_s,
    rss_max_seen_mib (the parent's polls), model_rss_mib; when ok: step_ms (median), step_ms_min, times_ms,
    step_peak_mib, process_peak_mib, device_peak_mib (CUDA), memory_method, gflops_per_s, ceiling_fraction,
    x_reference, x_seed, peak_vs_seed], "longest": {impl: largest completed n or null}}``."""
    from af2_ext.bench import common

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or torch.get_num_threads()
    budget_gib = args.budget_gb if args.budget_gb is not None else (8.0 if device == "cpu" else None)
    budget_bytes = None if budget_gib is None else int(budget_gib * _GIB)
    config = ScanConfig(dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                        msa_rows=args.msa_rows, inter_msa_self_attn=not args.msa_row_attn,
                        cross_attn_compress_ratio=args.compress_ratio, max_seq_len=args.max_seq_len,
                        trunk=args.trunk, pair_dim=args.pair_dim)
    env = common.environment(torch.device(device))
    env["threads"] = threads
    print(f"af2_ext model length scan: {env['device_name']} ({device}, threads={threads}), torch {env['torch']}; "
          f"{config.trunk} trunk, dim {config.dim}{f', pair_dim {config.pair_dim}' if config.pair_dim else ''}, "
          f"depth {config.depth}, heads {config.heads}, dim_head {config.dim_head}, MSA "
          f"{config.msa_rows} x n, budget {'the GPU memory' if budget_gib is None else f'{budget_gib:g} GiB'}",
          flush=True)
    started = time.perf_counter()
    ceiling = None
    if args.ceiling_size > 0:
        ceiling = run_child(sys.executable, {"base": "matmul", "size": args.ceiling_size, "reps": 10,
                                             "threads": threads, "device": device},
                            threads=threads, budget_bytes=None, timeout_s=args.timeout)
    records = scan(config, args.lengths, args.impls, reps=args.reps, warmup=args.warmup, device=device,
                   threads=threads, budget_bytes=budget_bytes, timeout_s=args.timeout, seed_python=args.seed_python,
                   runner=functools.partial(run_child, malloc=args.malloc), progress=common.progress)
    summarise(records, ceiling)
    print(report(records, args.impls, ceiling, budget_bytes, device))
    wall = round(time.perf_counter() - started, 1)
    doc = {"benchmark": "model_scan", "environment": env,
           "settings": {"lengths": sorted(args.lengths), "impls": [i.name for i in args.impls], "reps": args.reps,
                        "warmup": args.warmup, "config": dataclasses.asdict(config), "device": device,
                        "threads": threads, "budget_gib": budget_gib, "budget_bytes": budget_bytes,
                        "timeout_s": args.timeout, "seed_python": args.seed_python, "wall_s": wall,
                        "malloc": args.malloc,
                        "child_env": {k: os.environ.get(k, default) for k, default in (
                            ("OMP_WAIT_POLICY", None),
                            ("MALLOC_MMAP_THRESHOLD_", str(128 * 1024) if args.malloc == "unmapped" else None))}},
           "ceiling": ceiling, "results": records, "longest": longest(records, args.impls)}
    path = args.json or os.path.join("bench_results", f"model_scan-{device}.json")
    common.write_json_atomic(path, doc)
    print(f"\nwrote {path} ({wall:.0f} s)")
    if args.plot:
        common.say_plot(args.plot, plot(records, args.impls, budget_bytes, args.plot))
    return 0
