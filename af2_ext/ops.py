"""Public af2_ext ops: argument checks, the compiled kernels (``torch.ops.af2_ext``), fake kernels for
``torch.compile`` and autograd.

Which implementation runs is chosen in one place, :func:`_use_kernel`: ``impl="auto"`` (the default) runs the
compiled kernel where one is registered for the input's device and otherwise the pure-PyTorch reference
(:mod:`af2_ext.reference`) with one warning; ``"kernel"`` requires the kernel; ``"reference"`` always runs the
reference.
"""
from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from typing import Iterator, Optional

import numpy as np
import torch

from af2_ext import reference

try:
    from af2_ext import _C  # noqa: F401  (loading it registers torch.ops.af2_ext.*)

    _EXTENSION_ERROR: Optional[BaseException] = None
except ImportError as error:  # the package still imports; ops fall back to the reference
    _EXTENSION_ERROR = error

CPU_ISAS = ("generic", "avx2", "avx512", "avx512_bf16")
if os.environ.get("AF2_EXT_CPU_ISA") and os.environ["AF2_EXT_CPU_ISA"] not in CPU_ISAS:
    warnings.warn(f"AF2_EXT_CPU_ISA={os.environ['AF2_EXT_CPU_ISA']!r} is not one of {CPU_ISAS}; ignored (the "
                  "CPU kernels use the best instruction set this CPU has)", RuntimeWarning)

BUILD_HINT = "build it with `python -m pip install --no-build-isolation -e .` from the af2_ext checkout"
IMPLS = ("auto", "kernel", "reference")
_default_impl = "auto"
_warned: set = set()


def extension_available() -> bool:
    """True when the compiled extension ``af2_ext._C`` loaded."""
    return _EXTENSION_ERROR is None


def cpu_isa() -> str:
    """Instruction set the CPU kernels dispatch to here ("avx512_bf16", "avx512", "avx2" or "generic"; bf16 inputs
    run the bf16 dot-product kernels only at "avx512_bf16", the fp32 kernels on fp32 copies below it)."""
    if not extension_available():
        return "none (extension not built)"
    return torch.ops.af2_ext.cpu_isa()


def set_default_impl(impl: str) -> None:
    """Set the process-wide implementation choice: "auto", "kernel" or "reference"."""
    global _default_impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _default_impl = impl


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Context manager form of :func:`set_default_impl`."""
    previous = _default_impl
    set_default_impl(impl)
    try:
        yield
    finally:
        set_default_impl(previous)


_OPS = ("block_sparse_attention_forward", "kv_compress_forward", "coupling_forward_")
# (op, device type) -> registered kernel? Read once: a dict lookup is something torch.compile can trace.
_KERNELS = {
    (op, device): extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"af2_ext::{op}", key)
    for op in _OPS
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}


def _has_kernel(op: str, device: torch.device) -> bool:
    return _KERNELS.get((op, device.type), False)


def kernel_runs(op: str, device: torch.device, impl: Optional[str] = None) -> bool:
    """Whether a call of ``op`` ("block_sparse_attention_forward", "kv_compress_forward", "coupling_forward_")
    with ``impl`` (None = the process default) on ``device`` has a kernel to run, without warning. A call whose
    configuration the kernel does not support may still fall back to the reference."""
    impl = _default_impl if impl is None else impl
    return impl != "reference" and _has_kernel(op, device)


def _check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _use_kernel(op: str, device: torch.device, impl: Optional[str], dropout_p: float = 0.0,
                unsupported: Optional[str] = None) -> bool:
    """The one place that chooses kernel vs reference. Attention-probability dropout is not in the kernels:
    ``dropout_p > 0`` runs the reference (one warning per op). ``unsupported``: why the kernel cannot run this
    call's configuration (see :func:`_cuda_unsupported`); the reference runs, with one warning per reason, or
    ``impl="kernel"`` raises it."""
    impl = _default_impl if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    if unsupported is not None and _has_kernel(op, device):
        if impl == "kernel":
            raise RuntimeError(f"impl='kernel' but {unsupported}; use impl='auto' (falls back to the reference)")
        if (op, unsupported) not in _warned:
            _warned.add((op, unsupported))
            warnings.warn(f"{unsupported}; running the pure-PyTorch reference for these calls", RuntimeWarning,
                          stacklevel=3)
        return False
    if dropout_p > 0:
        if impl == "kernel":
            raise RuntimeError(f"impl='kernel' but the {op} kernels have no attention dropout (dropout_p="
                               f"{dropout_p}); use dropout_p=0 or impl='auto' (falls back to the reference)")
        if (op, "dropout") not in _warned:
            _warned.add((op, "dropout"))
            warnings.warn(f"{op}: the kernels have no attention-probability dropout; dropout_p > 0 runs the "
                          "pure-PyTorch reference (O(Nq*Nk) memory) for these calls", RuntimeWarning, stacklevel=3)
        return False
    if _has_kernel(op, device):
        return True
    if extension_available():
        why = f"af2_ext was built without a {device.type} kernel for {op}"
    else:
        why = f"the compiled extension af2_ext._C is not available ({_EXTENSION_ERROR})"
    if impl == "kernel":
        raise RuntimeError(f"impl='kernel' but {why}; {BUILD_HINT}")
    if (op, device.type) not in _warned:
        _warned.add((op, device.type))
        warnings.warn(f"{why}; falling back to the pure-PyTorch reference (slow, O(Nq*Nk) memory). {BUILD_HINT}",
                      RuntimeWarning, stacklevel=3)
    return False


def _cuda_unsupported(op: str, dtype: torch.dtype, device: torch.device, head_dim: Optional[int] = None,
                      block_size: Optional[int] = None, backward: bool = False) -> Optional[str]:
    """Why the CUDA kernels cannot run a configuration, or None (also for every CPU call): float64 (the CUDA
    kernels stop at fp32), or attention tiles needing more shared memory per block than this GPU allows (with
    ``head_dim`` and ``block_size``; ``backward``: the training step's kernels too)."""
    if device.type != "cuda":
        return None
    if dtype == torch.float64:
        return f"{op}: the CUDA kernels have no float64 path"
    if head_dim is None or torch.compiler.is_compiling() or not _has_kernel("block_sparse_attention_forward", device):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device("cuda", index)
    key = (dtype, head_dim, block_size, backward, index)
    if key not in _SMEM_VERDICTS:
        _SMEM_VERDICTS[key] = _smem_verdict(op, dtype, head_dim, block_size, backward, device)
    return _SMEM_VERDICTS[key]


_SMEM_VERDICTS: dict = {}


def _smem_verdict(op, dtype, head_dim, block_size, backward, device) -> Optional[str]:
    need = torch.ops.af2_ext.block_sparse_attention_cuda_smem_bytes(dtype, head_dim, block_size, backward)
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if need < 0 or limit is None or need <= limit:
        return None  # the binding still checks, with a clear error
    return (f"{op}: {dtype} with head dim D={head_dim} and block_size={block_size} needs {need} bytes of shared "
            f"memory per block{' (backward)' if backward else ''}, more than {props.name}'s {limit}")


def _no_double_backward(op: str) -> None:
    """The kernels' backward ops have no derivative of their own: a graph of the gradient (create_graph=True, for
    a second-order gradient) is refused rather than silently zero."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{op}: second-order gradients (create_graph=True) are not implemented by the af2_ext "
                           "kernels; use impl='reference' for double backward")


def _wants_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------------------
# block-sparse attention
# ----------------------------------------------------------------------------------------------------------

BLOCK_SIZES = (16, 32, 64, 128)
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _require(condition: bool, message) -> None:
    """Raise ValueError(message()) unless condition: plain Python, so torch.compile traces it (the fake
    kernels check with torch._check instead)."""
    if not condition:
        raise ValueError(message())


def _check_attention_inputs(q, k, v, block_size, key_padding_mask, bias, check=_require) -> None:
    """The checks the C++ binding makes on q, k, v, block_size, the mask and the bias, same messages."""
    check(q.dim() == 4, lambda: f"q must be (B, H, Nq, D), got {_shape(q)}")
    check(k.dim() == 4, lambda: f"k must be (B, H, Nk, D), got {_shape(k)}")
    check(v.dim() == 4, lambda: f"v must be (B, H, Nk, D), got {_shape(v)}")
    check(q.dtype in DTYPES, lambda: f"q must be float32, float16 or bfloat16 (float64 on CPU), got {q.dtype}")
    check(k.dtype == q.dtype and v.dtype == q.dtype,
          lambda: f"k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    check(k.shape[0] == B and k.shape[1] == H and k.shape[3] == D,
          lambda: f"k must be (B={B}, H={H}, Nk, D={D}), got {_shape(k)}")
    check(v.shape == k.shape, lambda: f"v must have k's shape {_shape(k)}, got {_shape(v)}")
    check(D in HEAD_DIMS, lambda: f"head dim D (q.size(-1)) must be 16, 32, 64 or 128, got {D}")
    check(block_size in BLOCK_SIZES, lambda: f"block_size must be 16, 32, 64 or 128, got {block_size}")
    check(B > 0 and H > 0 and Nq > 0 and Nk > 0,
          lambda: f"q and k must be non-empty, got q {_shape(q)} and k {_shape(k)}")
    check(k.device == q.device and v.device == q.device,
          lambda: f"k and v must be on q's device {q.device}, got {k.device} and {v.device}")
    if key_padding_mask is not None:
        m = key_padding_mask
        check(m.dtype == torch.bool, lambda: f"key_padding_mask must be bool (True = keep), got {m.dtype}")
        check(m.dim() == 2 and m.shape[0] == B and m.shape[1] == Nk,
              lambda: f"key_padding_mask must be (B={B}, Nk={Nk}), got {_shape(m)}")
        check(m.device == q.device, lambda: f"key_padding_mask must be on q's device {q.device}, got {m.device}")
    if bias is not None:
        check(bias.is_floating_point(), lambda: f"bias must be a floating tensor, got {bias.dtype}")
        check(bias.dim() == 4 and bias.shape[0] > 0 and B % bias.shape[0] == 0 and bias.shape[1] in (1, H)
              and bias.shape[2] == Nq and bias.shape[3] == Nk,
              lambda: f"bias must be (Bb, 1 or H={H}, Nq={Nq}, Nk={Nk}) with B={B} divisible by Bb, "
                      f"got {_shape(bias)}")
        check(bias.device == q.device, lambda: f"bias must be on q's device {q.device}, got {bias.device}")


def _check_block_sparse(q, k, v, layout, block_size, key_padding_mask, bias) -> None:
    """Checks of the public op's arguments; errors name the argument and the shape expected."""
    for name, t in (("q", q), ("k", k), ("v", v), ("layout", layout)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_attention_inputs(q, k, v, block_size, key_padding_mask, bias)
    _check_layout(layout, q, k.shape[2], block_size, "ceil(Nk/block_size)")


def _check_layout(layout, q, num_keys: int, block_size: int, key_blocks: str, note: str = "") -> None:
    """layout: bool (1 or H, ceil(Nq / block_size), ceil(num_keys / block_size)) on q's device; ``key_blocks``
    names the last dimension in the message, ``note`` adds to it."""
    H, nqb, nkb = q.shape[1], -(-q.shape[2] // block_size), -(-num_keys // block_size)
    _require(layout.dtype == torch.bool, lambda: f"layout must be a bool tensor, got {layout.dtype}")
    _require(layout.dim() == 3 and layout.shape[0] in (1, H) and layout.shape[1] == nqb and layout.shape[2] == nkb,
             lambda: f"layout must be (1 or H={H}, ceil(Nq/block_size)={nqb}, {key_blocks}={nkb}){note}, "
                     f"got {_shape(layout)}")
    _require(layout.device == q.device, lambda: f"layout must be on q's device {q.device}, got {layout.device}")


def _check_layout_index(q, k, block_size, row_count, row_index, col_count, col_index, check) -> None:
    """The C++ binding's shape checks of the block index (its values are checked in the kernel's binding)."""
    H, nqb, nkb = q.shape[1], -(-q.shape[2] // block_size), -(-k.shape[2] // block_size)
    for count, index, cname, iname, outer, inner in ((row_count, row_index, "row_count", "row_index", nqb, nkb),
                                                     (col_count, col_index, "col_count", "col_index", nkb, nqb)):
        check(count.dtype == torch.int32 and index.dtype == torch.int32,
              lambda: f"{cname} and {iname} must be int32, got {count.dtype} and {index.dtype}")
        check(count.dim() == 2 and count.shape[0] in (1, H) and count.shape[1] == outer,
              lambda: f"{cname} must be (1 or H={H}, {outer}), got {_shape(count)}")
        check(index.dim() == 3 and index.shape[0] == count.shape[0] and index.shape[1] == outer
              and index.shape[2] == inner,
              lambda: f"{iname} must be ({count.shape[0]}, {outer}, {inner}), got {_shape(index)}")
    check(col_count.shape[0] == row_count.shape[0],
          lambda: f"col_count must have row_count's layout heads {row_count.shape[0]}, got {col_count.shape[0]}")


def layout_index(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compressed row and column index of a layout (static shapes, so it traces under torch.compile).

    Args:
        layout: bool (Hl, nqb, nkb).

    Returns:
        row_count int32 (Hl, nqb), row_index int32 (Hl, nqb, nkb): the first row_count[h, i] entries of
        row_index[h, i] are the key blocks of query block i, ascending; col_count (Hl, nkb) and
        col_index (Hl, nkb, nqb) likewise for the transposed layout.
    """

    def compress(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = grid.sum(-1, dtype=torch.int32)
        # A stable sort of "not visible" puts the visible blocks first, in ascending order.
        index = torch.sort((~grid).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        return count, index

    row_count, row_index = compress(layout)
    col_count, col_index = compress(layout.transpose(-1, -2))
    return row_count, row_index, col_count, col_index


# id(layout) -> (weak reference, snapshot of the layout, index): a CPU layout reused across calls (the usual case:
# one per model layer) is converted once. The weak reference tells a live layout from a new tensor that reuses a
# freed id; comparing the content with the snapshot catches every edit, also those that skip the version counter
# (an edited numpy array under torch.from_numpy, layout.numpy()[...] = ..., layout.data[...] = ...).
_INDEX_CACHE: dict = {}


def _check_index_values(count: torch.Tensor, index: torch.Tensor, name: str, limit: int) -> None:
    """Every counted entry of a block index is in [0, limit) and strictly ascending (a repeated block would be
    counted twice). Run once, where a CPU layout's index is built and cached. The CUDA kernels trust the index
    (checking it would be a host sync per call): on a GPU it is always the one layout_index just built."""
    width = index.shape[-1]
    used = torch.arange(width, device=index.device) < count.unsqueeze(-1)  # [Hl, rows, width]
    idx = index.long()
    ascending = torch.ones_like(used)
    ascending[..., 1:] = idx[..., 1:] > idx[..., :-1]
    bad = ((count < 0) | (count > width)).any() | (used & ~((idx >= 0) & (idx < limit) & ascending)).any()
    if bad.item():
        raise RuntimeError(f"{name}: the block index of a layout is corrupt (entries must be ascending and in "
                           f"[0, {limit})); this is a bug in af2_ext.ops.layout_index")


def _cached_layout_index(layout: torch.Tensor):
    """The block index of ``layout``. A layout on a GPU is converted on every call: a few tiny asynchronous
    kernels, where knowing whether it changed would take a host sync; a CPU layout is converted once and reused
    while its content stays the same."""
    if torch.compiler.is_compiling() or layout.is_inference() or layout.device.type != "cpu":
        return layout_index(layout)
    key = id(layout)
    hit = _INDEX_CACHE.get(key)
    # The content is compared through numpy, below torch's dispatcher: a hit then runs no torch op, so a region
    # that missed in its forward and hits in a checkpoint's recompute replays no op its forward did not record.
    if hit is not None and hit[0]() is layout and np.array_equal(hit[1].numpy(), layout.detach().numpy()):
        return hit[2]
    snapshot = layout.clone()
    index = layout_index(snapshot)
    row_count, row_index, col_count, col_index = index
    _check_index_values(row_count, row_index, "row_index", layout.shape[2])
    _check_index_values(col_count, col_index, "col_index", layout.shape[1])
    _INDEX_CACHE[key] = (weakref.ref(layout, lambda _, key=key: _INDEX_CACHE.pop(key, None)), snapshot, index)
    return index


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    *,
    block_size: int = 16,
    key_padding_mask: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """Attention restricted to the (query block, key block) pairs a layout marks, never materialising Nq x Nk.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D). fp32, fp16 or bf16 (fp64 on CPU); D in {16, 32, 64, 128}.
            Nq and Nk need not be equal nor multiples of block_size.
        layout: bool (H or 1, ceil(Nq / block_size), ceil(Nk / block_size)); True = computed, everything
            else is masked. See :mod:`af2_ext.layouts`.
        block_size: 16, 32, 64 or 128.
        key_padding_mask: bool (B, Nk), True = keep.
        bias: additive float bias (Bb, H or 1, Nq, Nk) with B % Bb == 0; batch row b uses bias row
            b // (B // Bb). Differentiable (its gradient is deterministic and zero outside the layout).
        scale: logit scale, default D ** -0.5.
        dropout_p: dropout on the attention probabilities (pass 0 outside training). Not in the kernels:
            > 0 runs the reference, with a one-time warning (an error with impl="kernel").
        impl: "auto" | "kernel" | "reference"; None uses the process default (:func:`set_default_impl`).

    Returns:
        (B, H, Nq, D) in q's dtype. A query row with no visible key is zero, with zero gradients.

    Non-finite values (kernel = reference): a pair removed by the layout, the key padding mask or the ends of
    the sequences is absent, so nothing its q, k, v or bias hold reaches any output or gradient. A NaN or +inf
    among a row's visible logits (from q, k, the bias or ``scale``) makes that row NaN; a non-finite v at a
    visible key makes the outputs it touches non-finite. A -inf logit (a -inf bias) gives the pair probability 0
    and an exactly zero bias gradient, but its term still enters the products: to exclude keys whose values may
    be non-finite, mask them with ``key_padding_mask`` or the layout.
    """
    _check_block_sparse(q, k, v, layout, block_size, key_padding_mask, bias)
    dropout_p = _check_dropout(dropout_p)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    unsupported = _cuda_unsupported("block_sparse_attention", q.dtype, q.device, q.shape[-1], block_size,
                                    _wants_grad(q, k, v, bias))
    if not _use_kernel("block_sparse_attention_forward", q.device, impl, dropout_p, unsupported):
        return reference.block_sparse_attention_ref(q, k, v, layout, block_size=block_size,
                                                    key_padding_mask=key_padding_mask, bias=bias, scale=scale,
                                                    dropout_p=dropout_p)
    row_count, row_index, col_count, col_index = _cached_layout_index(layout)
    out, _ = torch.ops.af2_ext.block_sparse_attention_forward.default(
        q, k, v, row_count, row_index, col_count, col_index, block_size, key_padding_mask, bias, scale)
    return out


def _check_triangle(q, k, v, bias, mask, layout, block_size) -> None:
    """Checks of triangle_attention's arguments in its own (B, N, H, Q, D) terms; errors name the argument."""
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _require(q.dim() == 5, lambda: f"q must be (B, N, H, Q, D), got {_shape(q)}")
    B, N, H, Q, D = q.shape
    _require(k.dim() == 5 and k.shape[:3] == (B, N, H) and k.shape[4] == D,
             lambda: f"k must be (B={B}, N={N}, H={H}, K, D={D}), got {_shape(k)}")
    _require(v.shape == k.shape, lambda: f"v must have k's shape {_shape(k)}, got {_shape(v)}")
    K = k.shape[3]
    _require(bias.is_floating_point(), lambda: f"bias must be a floating tensor, got {bias.dtype}")
    _require((bias.dim() == 5 and bias.shape == (B, 1, H, Q, K)) or (bias.dim() == 4 and bias.shape == (B, H, Q, K)),
             lambda: f"bias must be (B={B}, 1, H={H}, Q={Q}, K={K}) or (B, H, Q, K), got {_shape(bias)}")
    _require(bias.device == q.device, lambda: f"bias must be on q's device {q.device}, got {bias.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        _require(mask.dtype == torch.bool, lambda: f"mask must be bool (True = keep), got {mask.dtype}")
        _require((mask.dim() == 5 and mask.shape == (B, N, 1, 1, K)) or (mask.dim() == 3 and mask.shape == (B, N, K)),
                 lambda: f"mask must be (B={B}, N={N}, 1, 1, K={K}) or (B, N, K), got {_shape(mask)}")
        _require(mask.device == q.device, lambda: f"mask must be on q's device {q.device}, got {mask.device}")
    if layout is not None:
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"layout must be a torch.Tensor or None, got {type(layout).__name__}")
        _require(block_size in BLOCK_SIZES, lambda: f"block_size must be 16, 32, 64 or 128, got {block_size}")
        nqb, nkb = -(-Q // block_size), -(-K // block_size)
        _require(layout.dtype == torch.bool, lambda: f"layout must be a bool tensor, got {layout.dtype}")
        _require(layout.dim() == 3 and layout.shape[0] in (1, H) and layout.shape[1] == nqb and layout.shape[2] == nkb,
                 lambda: f"layout must be (1 or H={H}, ceil(Q/block_size)={nqb}, ceil(K/block_size)={nkb}), "
                         f"got {_shape(layout)}")


def triangle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    layout: Optional[torch.Tensor] = None,
    block_size: int = 64,
    scale: Optional[float] = None,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """Attention within each of N rows with one additive bias that all rows share: AlphaFold2's triangle
    attention (supplementary Alg. 13/14) and MSA row attention with pair bias (Alg. 7), in cuEquivariance's layout.

    Runs on the block-sparse kernels (:func:`block_sparse_attention`) with the rows as the batch and the bias
    shared by the rows of a batch element: ``softmax(scale * q k^T + bias, masked) v`` per (b, n, h).

    Args:
        q: (B, N, H, Q, D); k, v: (B, N, H, K, D). Same dtypes and head dims as :func:`block_sparse_attention`.
            Read in place (no copy) when the B and N dimensions can be merged into one stride, as they can for
            any view of a (B, N, Q, H * D) projection; otherwise they are copied first.
        bias: (B, 1, H, Q, K) or (B, H, Q, K), shared by the N rows of batch element b. Differentiable; its
            gradient sums over the rows in a fixed order: bitwise the same across runs and thread counts.
        mask: bool (B, N, 1, 1, K) or (B, N, K), True = keep the key. A row whose keys are all masked is zero,
            with zero gradients.
        layout: optional bool (H or 1, ceil(Q / block_size), ceil(K / block_size)) block-sparse layout over
            (query, key) blocks; None = dense.
        block_size: the kernels' tile (and the layout's block): 16, 32, 64 or 128.
        scale: logit scale, default D ** -0.5.
        impl: "auto" | "kernel" | "reference", as :func:`block_sparse_attention`.

    Returns:
        (B, N, H, Q, D) in q's dtype.
    """
    _check_triangle(q, k, v, bias, mask, layout, block_size)
    B, N, H, Q, D = q.shape
    K = k.shape[3]
    bias4 = bias.squeeze(1) if bias.dim() == 5 else bias  # [B, H, Q, K]: batch row b * N + n reads bias row b
    kpm = None if mask is None else mask.reshape(B * N, K)
    if layout is None:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be 16, 32, 64 or 128, got {block_size}")
        layout = _dense_layout(-(-Q // block_size), -(-K // block_size), q.device)
    out = block_sparse_attention(q.reshape(B * N, H, Q, D), k.reshape(B * N, H, K, D), v.reshape(B * N, H, K, D),
                                 layout, block_size=block_size, key_padding_mask=kpm, bias=bias4, scale=scale,
                                 impl=impl)  # [B * N, H, Q, D]
    return out.reshape(B, N, H, Q, D)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if extension_available():

    @torch.library.register_fake("af2_ext::block_sparse_attention_forward")
    def _block_sparse_attention_forward_fake(q, k, v, row_count, row_index, col_count, col_index, block_size,
                                             key_padding_mask, bias, scale):
        _check_attention_inputs(q, k, v, block_size, key_padding_mask, bias, check=torch._check)
        _check_layout_index(q, k, block_size, row_count, row_index, col_count, col_index, check=torch._check)
        B, H, Nq, D = q.shape
        # The CPU kernel writes (B, H, Nq, D) in (B, Nq, H, D) memory (heads side by side, what the output
        # projection reads); the CUDA kernel a contiguous (B, H, Nq, D). Whatever q's strides.
        if q.device.type == "cpu":
            out = q.new_empty((B, Nq, H, D)).permute(0, 2, 1, 3)
        else:
            out = q.new_empty(q.shape)
        return out, q.new_empty((B, H, Nq), dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake("af2_ext::block_sparse_attention_backward")
    def _block_sparse_attention_backward_fake(grad_out, q, k, v, out, lse, row_count, row_index, col_count,
                                              col_index, block_size, key_padding_mask, bias, scale, output_mask):
        _check_attention_inputs(q, k, v, block_size, key_padding_mask, bias, check=torch._check)
        _check_layout_index(q, k, block_size, row_count, row_index, col_count, col_index, check=torch._check)
        torch._check(grad_out.shape == q.shape and out.shape == q.shape,
                     lambda: f"grad_out and out must have q's shape {_shape(q)}, got {_shape(grad_out)} and "
                             f"{_shape(out)}")

        def grad(wanted, like):  # contiguous, like the kernels' gradients
            return like.new_empty(like.shape) if wanted and like is not None else q.new_empty((0,))

        def grad_heads_inner(wanted, like):  # the CPU kernel's q, k, v gradients: (B, N, H, D) memory, as its out
            if not wanted or like.device.type != "cpu":
                return grad(wanted, like)
            B, H, N, D = like.shape
            return like.new_empty((B, N, H, D)).permute(0, 2, 1, 3)

        return (grad_heads_inner(output_mask[0], q), grad_heads_inner(output_mask[1], k),
                grad_heads_inner(output_mask[2], v), grad(output_mask[3], bias))

    def _block_sparse_attention_setup_context(ctx, inputs, output):
        q, k, v, row_count, row_index, col_count, col_index, block_size, key_padding_mask, bias, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)  # a by-product for the backward; the op has no gradient through it
        ctx.block_size, ctx.scale = block_size, scale
        ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[9]
        if any(ctx.needs_input_grad[i] for i in (0, 1, 2, 9)):
            ctx.save_for_backward(q, k, v, out, lse, row_count, row_index, col_count, col_index,
                                  key_padding_mask, bias)

    def _block_sparse_attention_backward(ctx, grad_out, grad_lse):
        _no_double_backward("block_sparse_attention")
        q, k, v, out, lse, row_count, row_index, col_count, col_index, key_padding_mask, bias = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.bias_needs_grad]
        grad_q, grad_k, grad_v, grad_bias = torch.ops.af2_ext.block_sparse_attention_backward.default(
            grad_out, q, k, v, out, lse, row_count, row_index, col_count, col_index, ctx.block_size,
            key_padding_mask, bias, ctx.scale, wanted)
        return (grad_q if wanted[0] else None, grad_k if wanted[1] else None, grad_v if wanted[2] else None,
                None, None, None, None, None, None, grad_bias if wanted[3] else None, None)

    torch.library.register_autograd("af2_ext::block_sparse_attention_forward", _block_sparse_attention_backward,
                                    setup_context=_block_sparse_attention_setup_context)


# ----------------------------------------------------------------------------------------------------------
# compressed (memory-compressed) attention
# ----------------------------------------------------------------------------------------------------------

# Without a layout the attention over the compressed keys is dense and the block size is ours to choose: 64 is
# the CPU kernel's fastest on dense layouts (BENCHMARKS.md) and a tensor-core friendly tile on CUDA.
DENSE_BLOCK_SIZE = 64


def _check_kv_compress_inputs(k, v, weight, bias, ratio, check=_require) -> None:
    """The checks the C++ binding of kv_compress makes, same messages."""
    check(k.dim() == 4, lambda: f"k must be (B, H, Nk, D), got {_shape(k)}")
    check(v.shape == k.shape, lambda: f"v must have k's shape {_shape(k)}, got {_shape(v)}")
    check(k.dtype in DTYPES, lambda: f"k must be float32, float16 or bfloat16 (float64 on CPU), got {k.dtype}")
    check(v.dtype == k.dtype, lambda: f"v must have k's dtype {k.dtype}, got {v.dtype}")
    B, H, Nk, D = k.shape
    check(B > 0 and H > 0 and Nk > 0, lambda: f"k must be non-empty, got {_shape(k)}")
    check(D in HEAD_DIMS, lambda: f"head dim D (k.size(-1)) must be 16, 32, 64 or 128, got {D}")
    check(ratio >= 1, lambda: f"ratio must be >= 1, got {ratio}")
    check(v.device == k.device, lambda: f"v must be on k's device {k.device}, got {v.device}")
    check(weight.is_floating_point(), lambda: f"weight must be a floating tensor, got {weight.dtype}")
    check(weight.dim() == 3 and weight.shape[0] == H * D and weight.shape[1] == D and weight.shape[2] == ratio,
          lambda: f"weight must be (H*D={H * D}, D={D}, ratio={ratio}), got {_shape(weight)}")
    check(weight.device == k.device, lambda: f"weight must be on k's device {k.device}, got {weight.device}")
    if bias is not None:
        check(bias.is_floating_point(), lambda: f"bias must be a floating tensor, got {bias.dtype}")
        check(bias.dim() == 1 and bias.shape[0] == H * D, lambda: f"bias must be (H*D={H * D},), got {_shape(bias)}")
        check(bias.device == k.device, lambda: f"bias must be on k's device {k.device}, got {bias.device}")


def _check_ratio(ratio) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int):
        raise TypeError(f"ratio must be an int, got {type(ratio).__name__}")
    _require(ratio >= 1, lambda: f"ratio must be >= 1, got {ratio}")


def kv_compress(k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ratio: int,
                *, impl: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values compressed along the sequence by the strided grouped convolution of memory-compressed
    attention, ``Conv1d(H*D, H*D, kernel_size=ratio, stride=ratio, groups=H)``, in one fused kernel.

    The sequence is treated as zero-padded at the end to a multiple of ``ratio`` (nothing is copied).

    Args:
        k, v: (B, H, Nk, D); fp32, fp16 or bf16 (fp64 on CPU); D in {16, 32, 64, 128}.
        weight: (H*D, D, ratio), the convolution's weight (channel h*D + d is head h, dim d); any float dtype.
        bias: (H*D,) or None.
        ratio: kernel size and stride, >= 1.
        impl: "auto" | "kernel" | "reference".

    Returns:
        kc, vc: (B, H, ceil(Nk / ratio), D) in k's dtype (fp32 accumulation). Differentiable in k, v, weight
        and bias, with deterministic gradients.
    """
    for name, t in (("k", k), ("v", v), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_ratio(ratio)
    _check_kv_compress_inputs(k, v, weight, bias, ratio)
    if not _use_kernel("kv_compress_forward", k.device, impl,
                       unsupported=_cuda_unsupported("kv_compress", k.dtype, k.device)):
        kc, vc = reference.kv_compress_ref(k, v, weight, bias, ratio)
        return kc.to(k.dtype), vc.to(k.dtype)
    kc, vc = torch.ops.af2_ext.kv_compress_forward.default(k, v, weight, bias, ratio)
    return kc, vc


def compress_key_padding_mask(key_padding_mask: torch.Tensor, ratio: int) -> torch.Tensor:
    """(B, Nk) keep mask -> (B, ceil(Nk / ratio)): a compressed position is kept when any of its ``ratio``
    inputs is kept; one whose inputs are all padding (or past Nk) is masked."""
    batch, seq = key_padding_mask.shape
    pad = (-seq) % ratio
    if pad:
        key_padding_mask = torch.cat([key_padding_mask, key_padding_mask.new_zeros(batch, pad)], dim=1)
    return key_padding_mask.view(batch, -1, ratio).any(dim=-1)  # [b, Nc]


# (num query blocks, num key blocks, device) -> the all-True layout: one tensor per shape, so that its block
# index is built once (see _cached_layout_index).
_DENSE_LAYOUTS: dict = {}


def _dense_layout(num_q_blocks: int, num_k_blocks: int, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ones(1, num_q_blocks, num_k_blocks, dtype=torch.bool, device=device)
    key = (num_q_blocks, num_k_blocks, str(device))
    layout = _DENSE_LAYOUTS.get(key)
    if layout is None:
        if len(_DENSE_LAYOUTS) > 64:
            _DENSE_LAYOUTS.clear()
        layout = _DENSE_LAYOUTS[key] = torch.ones(1, num_q_blocks, num_k_blocks, dtype=torch.bool, device=device)
    return layout


def _check_compressed(q, k, v, ratio, weight, bias, key_padding_mask, layout, block_size) -> int:
    """Checks of compressed_attention's arguments; returns the compressed length Nc."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_ratio(ratio)
    _check_attention_inputs(q, k, v, block_size, key_padding_mask, None)
    if ratio == 1:
        _require(weight is None and bias is None,
                 lambda: "weight and bias must be None when ratio == 1 (ratio 1 is plain attention, no convolution)")
    else:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor when ratio > 1, got {type(weight).__name__}")
        _check_kv_compress_inputs(k, v, weight, bias, ratio)
    Nc = -(-k.shape[2] // ratio)
    if layout is not None:
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"layout must be a torch.Tensor or None, got {type(layout).__name__}")
        _check_layout(layout, q, Nc, block_size, "ceil(Nc/block_size)",
                      f" over the Nc=ceil(Nk/ratio)={Nc} compressed keys")
    return Nc


def compressed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ratio: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    layout: Optional[torch.Tensor] = None,
    block_size: int = 16,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """Memory-compressed attention (Liu et al. 2018), never materialising the Nq x Nk/ratio logits.

    Keys and values are compressed by ``Conv1d(H*D, H*D, kernel_size=ratio, stride=ratio, groups=H)``
    (:func:`kv_compress`, one fused kernel), then attended by the block-sparse flash kernels.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D), projected and uncompressed. fp32, fp16 or bf16 (fp64 on CPU);
            D in {16, 32, 64, 128}.
        ratio: compression ratio >= 1; 1 is plain attention (no convolution; weight and bias must be None).
            The context is treated as zero-padded at the end to a multiple of ratio, without a copy.
        weight: (H*D, D, ratio) convolution weight, shared by keys and values; bias: (H*D,) or None.
        key_padding_mask: bool (B, Nk), True = keep. Padded inputs are zeroed before the compression (they never
            contribute, whatever they hold); a compressed position is kept when any of its ``ratio`` inputs is
            kept, and one with no kept input is masked.
        layout: bool (H or 1, ceil(Nq / block_size), ceil(ceil(Nk / ratio) / block_size)) over query blocks x
            compressed key blocks (block-sparse cross-attention), or None for dense attention.
        block_size: the block size of ``layout`` (16, 32, 64 or 128). Without a layout the op tiles with
            :data:`DENSE_BLOCK_SIZE` whatever this says (the result does not depend on the tiling).
        scale: logit scale, default D ** -0.5.
        dropout_p: dropout on the attention probabilities, as :func:`block_sparse_attention` (reference only).
        impl: "auto" | "kernel" | "reference"; None uses the process default (:func:`set_default_impl`).

    Returns:
        (B, H, Nq, D) in q's dtype; a query row with no visible compressed key is zero, with zero gradients.
        Differentiable in q, k, v, weight and bias, with deterministic gradients.
    """
    num_compressed = _check_compressed(q, k, v, ratio, weight, bias, key_padding_mask, layout, block_size)
    dropout_p = _check_dropout(dropout_p)
    unsupported = _cuda_unsupported("compressed_attention", q.dtype, q.device, q.shape[-1],
                                    DENSE_BLOCK_SIZE if layout is None else block_size,
                                    _wants_grad(q, k, v, weight, bias))
    if not _use_kernel("kv_compress_forward", q.device, impl, dropout_p, unsupported):
        return reference.compressed_attention_ref(q, k, v, ratio, weight, bias, key_padding_mask=key_padding_mask,
                                                  layout=layout, block_size=block_size, scale=scale,
                                                  dropout_p=dropout_p)
    if ratio == 1:
        kc, vc, mask = k, v, key_padding_mask
    else:
        if key_padding_mask is not None:  # padded inputs never reach the compression, whatever they hold
            k, v = reference.zero_padded(k, key_padding_mask), reference.zero_padded(v, key_padding_mask)
        kc, vc = torch.ops.af2_ext.kv_compress_forward.default(k, v, weight, bias, ratio)
        mask = None if key_padding_mask is None else compress_key_padding_mask(key_padding_mask, ratio)
    if layout is None:
        block_size = DENSE_BLOCK_SIZE
        layout = _dense_layout(-(-q.shape[2] // block_size), -(-num_compressed // block_size), q.device)
    return block_sparse_attention(q, kc, vc, layout, block_size=block_size, key_padding_mask=mask, scale=scale,
                                  impl="kernel")


if extension_available():

    @torch.library.register_fake("af2_ext::kv_compress_forward")
    def _kv_compress_forward_fake(k, v, weight, bias, ratio):
        _check_kv_compress_inputs(k, v, weight, bias, ratio, check=torch._check)
        B, H, Nk, D = k.shape
        shape = (B, H, -(-Nk // ratio), D)
        return k.new_empty(shape), k.new_empty(shape)

    @torch.library.register_fake("af2_ext::kv_compress_backward")
    def _kv_compress_backward_fake(grad_kc, grad_vc, k, v, weight, bias, ratio, output_mask):
        _check_kv_compress_inputs(k, v, weight, bias, ratio, check=torch._check)
        B, H, Nk, D = k.shape
        shape = (B, H, -(-Nk // ratio), D)
        torch._check(grad_kc.shape == shape and grad_vc.shape == shape,
                     lambda: f"grad_kc and grad_vc must be (B, H, Nc, D) = {shape}, got {_shape(grad_kc)} and "
                             f"{_shape(grad_vc)}")

        def grad(wanted, like):  # contiguous, like the kernels' gradients
            return like.new_empty(like.shape) if wanted and like is not None else k.new_empty((0,))

        return (grad(output_mask[0], k), grad(output_mask[1], v), grad(output_mask[2], weight),
                grad(output_mask[3], bias))

    def _kv_compress_setup_context(ctx, inputs, output):
        k, v, weight, bias, ratio = inputs
        ctx.ratio = ratio
        ctx.has_bias = bias is not None
        needs_input = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        needs_weight = ctx.needs_input_grad[2]
        # grad k, v need the weight; grad weight needs k and v; grad bias needs neither (shapes only).
        ctx.save_for_backward(k if needs_weight else None, v if needs_weight else None,
                              weight if needs_input else None, bias)
        ctx.shapes = (k.shape, k.dtype, weight.shape, weight.dtype)

    def _kv_compress_backward(ctx, grad_kc, grad_vc):
        _no_double_backward("kv_compress (compressed_attention)")
        k, v, weight, bias = ctx.saved_tensors
        k_shape, k_dtype, w_shape, w_dtype = ctx.shapes
        # The backward op reads what it needs; stand-ins for the rest carry only shapes (never read).
        if k is None:
            k = v = grad_kc.new_zeros(()).expand(k_shape)
        if weight is None:
            weight = grad_kc.new_zeros((), dtype=w_dtype).expand(w_shape)
        grad_kc = grad_kc if grad_kc is not None else torch.zeros_like(grad_vc)
        grad_vc = grad_vc if grad_vc is not None else torch.zeros_like(grad_kc)
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                  ctx.has_bias and ctx.needs_input_grad[3]]
        grad_k, grad_v, grad_weight, grad_bias = torch.ops.af2_ext.kv_compress_backward.default(
            grad_kc, grad_vc, k, v, weight, bias, ctx.ratio, wanted)
        return (grad_k if wanted[0] else None, grad_v if wanted[1] else None, grad_weight if wanted[2] else None,
                grad_bias if wanted[3] else None, None)

    torch.library.register_autograd("af2_ext::kv_compress_forward", _kv_compress_backward,
                                    setup_context=_kv_compress_setup_context)


# ----------------------------------------------------------------------------------------------------------
# fused coupling steps of reversible recompute (af2_ext.reversible)
# ----------------------------------------------------------------------------------------------------------

COUPLING_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_coupling_pair(dst, src, dst_name, src_name, check=_require) -> None:
    """The checks of the C++ bindings of the coupling ops, same messages."""
    check(dst.dtype in COUPLING_DTYPES,
          lambda: f"{dst_name} must be float32, float16 or bfloat16 (float64 on CPU), got {dst.dtype}")
    check(dst.is_contiguous(), lambda: f"{dst_name} must be contiguous (it is updated in place)")
    check(src.shape == dst.shape, lambda: f"{src_name} must have {dst_name}'s shape {_shape(dst)}, got {_shape(src)}")
    check(src.dtype in (dst.dtype, torch.float32, torch.float16, torch.bfloat16),
          lambda: f"{src_name} must have {dst_name}'s dtype {dst.dtype} or be float32, float16 or bfloat16, "
                  f"got {src.dtype}")
    check(src.device == dst.device,
          lambda: f"{src_name} must be on {dst_name}'s device {dst.device}, got {src.device}")


def _memory_span(t: torch.Tensor) -> tuple:
    """(storage pointer, first byte, one past the last byte) that ``t`` can touch."""
    if t.numel() == 0:
        return (None, 0, 0)
    start = t.storage_offset() * t.element_size()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0) + 1
    return (t.untyped_storage().data_ptr(), start, start + extent * t.element_size())


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b may share memory: the same storage and intersecting byte ranges (conservative for strided views).
    Not asked while compiling (a traced graph has no data pointers; the C++ bindings check at run time)."""
    if torch.compiler.is_compiling():
        return False
    (pa, a0, a1), (pb, b0, b1) = _memory_span(a), _memory_span(b)
    return pa is not None and pa == pb and a0 < b1 and b0 < a1


def _partially_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b share memory without being the very same elements (element-wise in-place ops allow the latter)."""
    if not _overlap(a, b):
        return False
    return not (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                and a.dtype == b.dtype)


def _check_no_partial_overlap(dst, src, dst_name: str, src_name: str) -> None:
    _require(not _partially_overlap(dst, src),
             lambda: f"{src_name} must not partially overlap {dst_name} (it is read while {dst_name} is written)")


def _check_no_overlap(written, other, written_name: str, other_name: str) -> None:
    _require(not _overlap(written, other),
             lambda: f"{other_name} must not overlap {written_name} ({written_name} is updated in place)")


def _check_coupling_overlaps(y, f, grad, vjp) -> None:
    """The buffers coupling_backward_ writes (y, grad) must not alias each other or the other pair's input; each
    may be its own input (an element-wise update) but not overlap it partially. Same messages as the bindings."""
    _check_no_overlap(grad, y, "grad", "y")
    _check_no_partial_overlap(y, f, "y", "f")
    _check_no_partial_overlap(grad, vjp, "grad", "vjp")
    _check_no_overlap(y, vjp, "y", "vjp")
    _check_no_overlap(grad, f, "grad", "f")


def coupling_forward_(x: torch.Tensor, f: torch.Tensor, *, impl: Optional[str] = None) -> torch.Tensor:
    """``x += f`` in place (a reversible coupling's forward, ``y = x + f``) with fp32 arithmetic for fp16/bf16
    storage; ``f`` of x's shape, in x's dtype or fp32/fp16/bf16 (never rounded before the add). x must be
    contiguous. Not differentiable (it runs inside the reversible autograd function). Returns x."""
    _check_coupling_pair(x, f, "x", "f")
    _check_no_partial_overlap(x, f, "x", "f")
    if _use_kernel("coupling_forward_", x.device, impl,
                   unsupported=_cuda_unsupported("coupling_forward_", x.dtype, x.device)):
        torch.ops.af2_ext.coupling_forward_.default(x, f)
    else:
        reference.coupling_forward_ref(x, f)
    return x


def coupling_backward_(y: torch.Tensor, f: torch.Tensor, grad: torch.Tensor, vjp: torch.Tensor, *,
                       impl: Optional[str] = None) -> None:
    """In one pass: ``y -= f`` (rebuild a coupling's target input from its output) and ``grad += vjp``
    (accumulate the gradient of the coupling's input half), both in place with fp32 arithmetic for fp16/bf16
    storage. ``f`` / ``vjp`` in the buffer's dtype or fp32/fp16/bf16; y and grad contiguous and distinct."""
    _check_coupling_pair(y, f, "y", "f")
    _check_coupling_pair(grad, vjp, "grad", "vjp")
    _require(grad.device == y.device, lambda: f"grad must be on y's device {y.device}, got {grad.device}")
    _check_coupling_overlaps(y, f, grad, vjp)
    if _use_kernel("coupling_forward_", y.device, impl,
                   unsupported=_cuda_unsupported("coupling_backward_", y.dtype, y.device)):
        torch.ops.af2_ext.coupling_backward_.default(y, f, grad, vjp)
    else:
        reference.coupling_backward_ref(y, f, grad, vjp)


if extension_available():

    @torch.library.register_fake("af2_ext::coupling_forward_")
    def _coupling_forward_fake(x, f):
        _check_coupling_pair(x, f, "x", "f", check=torch._check)

    @torch.library.register_fake("af2_ext::coupling_backward_")
    def _coupling_backward_fake(y, f, grad, vjp):
        _check_coupling_pair(y, f, "y", "f", check=torch._check)
        _check_coupling_pair(grad, vjp, "grad", "vjp", check=torch._check)
