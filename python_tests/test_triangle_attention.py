"""Tests for af2_ext.ops.triangle_attention against af2_ext.reference.triangle_attention_ref (dense, as OpenFold
writes it): values and gradients on odd shapes, masks (fully masked rows), a block-sparse layout, strided inputs
read in place, the bias gradient's determinism, gradcheck, opcheck, torch.compile and errors that name the argument.
Each test is written once and parametrised by device (``helpers.DEVICES``); tolerances from helpers.assert_matches.
"""
from __future__ import annotations

import pytest
import torch

import helpers
from af2_ext import ops, reference

OP = "block_sparse_attention_forward"
tri = ops.triangle_attention


def _inputs(device, dtype=torch.float32, *, B=2, N=3, H=2, Q=37, K=None, D=16, seed=0, bias5=True, mask=True,
            masked_rows=(), heads_inner=True) -> dict:
    """q (B, N, H, Q, D), k and v (B, N, H, K, D), bias (B, 1, H, Q, K) (or (B, H, Q, K)), mask (B, N, 1, 1, K)
    with about 20 % of the keys masked and the rows ``masked_rows`` (pairs (b, n)) fully masked. With
    ``heads_inner`` q, k and v are permuted views of (B, N, Q, H, D) storage, as a projection leaves them."""
    K = Q if K is None else K

    def qkv(n, s):
        if heads_inner:
            return helpers.randn(B, N, n, H, D, seed=s, dtype=dtype, device=device).permute(0, 1, 3, 2, 4)
        return helpers.randn(B, N, H, n, D, seed=s, dtype=dtype, device=device)

    q, k, v = qkv(Q, seed), qkv(K, seed + 1), qkv(K, seed + 2)
    bias = helpers.randn(B, 1, H, Q, K, seed=seed + 3, dtype=dtype, device=device)
    if not bias5:
        bias = bias.squeeze(1)
    m = None
    if mask:
        m = torch.rand(B, N, 1, 1, K, generator=helpers.generator(seed + 4)) >= 0.2
        for b, n in masked_rows:
            m[b, n] = False
        m = m.to(device)
    for t in (q, k, v, bias):
        t.requires_grad_()
    return dict(q=q, k=k, v=v, bias=bias, mask=m)


def _diff(inputs: dict) -> dict:
    return {name: inputs[name] for name in ("q", "k", "v", "bias")}


def _grad_out(inputs: dict) -> torch.Tensor:
    q = inputs["q"]
    return helpers.randn(*q.shape, seed=99, dtype=q.dtype, device=q.device)


def _lowp(q, k, v, bias, mask=None, scale=None):
    """The reference's math in q's (low-precision) dtype, every intermediate rounded to it."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, N, H, Q, _ = q.shape
    bias = bias.squeeze(1) if bias.dim() == 5 else bias
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale + bias[:, None].to(q.dtype)  # [b, n, h, q, k]
    if mask is None:
        return torch.matmul(torch.softmax(logits, -1), v)
    keep = mask.reshape(B, N, 1, 1, -1)
    probs = torch.softmax(logits.masked_fill(~keep, torch.finfo(q.dtype).min), -1).masked_fill(~keep, 0.0)
    return torch.matmul(probs, v).masked_fill(~keep.any(-1, keepdim=True), 0.0)


def _check(inputs: dict, *, scale=None, **kwargs) -> tuple[torch.Tensor, dict]:
    """The op's output and gradients against the reference (fp64 oracle; the low-precision rule for fp16/bf16)."""
    dtype = inputs["q"].dtype
    grad_out = _grad_out(inputs)
    out, grads = helpers.forward_backward(tri, _diff(inputs), grad_out, mask=inputs["mask"], scale=scale,
                                          impl="kernel", **kwargs)
    ref, ref_grads = helpers.forward_backward(reference.triangle_attention_ref, _diff(inputs), grad_out,
                                              dtype=helpers.oracle_dtype(dtype), mask=inputs["mask"], scale=scale)
    lowp, lowp_grads = None, {}
    if dtype in helpers.LOW_PRECISION:
        lowp, lowp_grads = helpers.forward_backward(_lowp, _diff(inputs), grad_out, mask=inputs["mask"], scale=scale)
    assert out.shape == inputs["q"].shape and out.dtype == dtype, f"out is {tuple(out.shape)} {out.dtype}"
    helpers.assert_matches("out", out, ref, ref_lowp=lowp)
    for name in ("q", "k", "v", "bias"):
        helpers.assert_matches(f"grad {name}", grads[name], ref_grads[name], kind="grad",
                               ref_lowp=lowp_grads.get(name), precision=dtype)
    return out, grads


# ----------------------------------------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------------------------------------

# (B, N, H, Q, K, D, block_size): odd lengths, Q != K, lengths that are not multiples of the block
SHAPES = [(2, 3, 2, 37, 37, 16, 16), (1, 5, 4, 70, 70, 32, 64), (2, 2, 2, 17, 40, 64, 32), (1, 4, 1, 33, 9, 16, 16)]


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}N{}H{}Q{}K{}D{}bs{}".format(*s))
def test_matches_reference(device, shape):
    helpers.require_device(device, OP)
    B, N, H, Q, K, D, bs = shape
    _check(_inputs(device, B=B, N=N, H=H, Q=Q, K=K, D=D, masked_rows=[(0, 1)]), block_size=bs)


@pytest.mark.parametrize("device, dtype", helpers.per_device(cpu=[torch.float64, torch.bfloat16],
                                                             cuda=[torch.float16, torch.bfloat16]))
def test_dtypes(device, dtype):
    helpers.require_device(device, OP)
    _check(_inputs(device, dtype, B=1, N=3, H=2, Q=40, D=32, seed=3), block_size=32)


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_bias_4d_no_mask_custom_scale(device):
    helpers.require_device(device, OP)
    _check(_inputs(device, bias5=False, mask=False, heads_inner=False, seed=5), scale=0.3)


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_fully_masked_rows_are_zero(device):
    """A row whose keys are all masked: output and the gradients of its q, k and v exactly zero, nothing NaN, and it
    adds nothing to the bias gradient."""
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=2, N=3, H=2, Q=21, masked_rows=[(0, 0), (1, 2)], seed=7)
    out, grads = _check(inputs)
    for b, n in [(0, 0), (1, 2)]:
        assert torch.equal(out[b, n], torch.zeros_like(out[b, n])), f"row ({b}, {n}) output is not zero"
        for name in ("q", "k", "v"):
            g = grads[name][b, n]
            assert torch.equal(g, torch.zeros_like(g)), f"row ({b}, {n}) grad {name} is not zero"
    # All rows of batch element 0 but row 0 removed: the bias gradient of b = 0 is the other rows' alone.
    only = dict(inputs)
    only_mask = inputs["mask"].clone()
    only_mask[0, 1:] = True  # rows 1, 2 of b=0 see every key; row 0 stays fully masked
    only["mask"] = only_mask
    _, g_all = helpers.forward_backward(tri, _diff(only), _grad_out(only), mask=only_mask, impl="kernel")
    sub = {name: t[:, 1:].detach().requires_grad_() if name != "bias" else t.detach().requires_grad_()
           for name, t in _diff(only).items()}
    _, g_rest = helpers.forward_backward(tri, sub, _grad_out(only)[:, 1:], mask=only_mask[:, 1:], impl="kernel")
    helpers.assert_matches("bias grad without the masked row", g_all["bias"][0], g_rest["bias"][0], kind="grad")


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_block_sparse_layout(device):
    """A per-head layout over (query, key) blocks: equal to the reference with the layout's blocks masked."""
    helpers.require_device(device, OP)
    B, N, H, Q, D, bs = 1, 3, 2, 40, 16, 16
    inputs = _inputs(device, B=B, N=N, H=H, Q=Q, D=D, mask=False, seed=9)
    layout = helpers.random_layout(H, 3, 3, seed=19).to(device)
    layout[:, :, 0] = True  # every query block sees the first key block
    grad_out = _grad_out(inputs)
    out, grads = helpers.forward_backward(tri, _diff(inputs), grad_out, layout=layout, block_size=bs, impl="kernel")

    def ref(q, k, v, bias):  # the block-sparse reference on the rows folded into the batch
        fold = lambda t: t.reshape(B * N, H, t.shape[3], D)  # noqa: E731  [b*n, h, q, d]
        o = reference.block_sparse_attention_ref(fold(q), fold(k), fold(v), layout, block_size=bs,
                                                 bias=bias.squeeze(1))
        return o.reshape(B, N, H, Q, D)

    ref_out, ref_grads = helpers.forward_backward(ref, _diff(inputs), grad_out, dtype=torch.float64)
    helpers.assert_matches("out", out, ref_out)
    for name in grads:
        helpers.assert_matches(f"grad {name}", grads[name], ref_grads[name], kind="grad")


def test_strided_inputs_read_in_place(monkeypatch):
    """q, k, v as views of (B, N, Q, H, D) projections reach the kernel as views of the same storage (no copy)."""
    inputs = _inputs("cpu", heads_inner=True, seed=11)
    seen = {}
    original = ops.block_sparse_attention

    def spy(q, k, v, *args, **kwargs):
        seen.update(q=q, k=k, v=v)
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(ops, "block_sparse_attention", spy)
    tri(inputs["q"], inputs["k"], inputs["v"], inputs["bias"], inputs["mask"], impl="kernel")
    for name in ("q", "k", "v"):
        assert seen[name].data_ptr() == inputs[name].data_ptr() and not seen[name].is_contiguous(), \
            f"{name} was copied before the kernel"


# ----------------------------------------------------------------------------------------------------------
# Determinism, gradcheck, opcheck, compile
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_bias_gradient_deterministic(device):
    """The bias gradient (a sum over the N rows) is bitwise the same across runs, and on the CPU across 1 and the
    default number of threads."""
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=2, N=40, H=4, Q=70, D=32, seed=13)
    threads = [torch.get_num_threads(), torch.get_num_threads(), 1] if device == "cpu" else [1, 1]
    runs = []
    for n in threads:
        with helpers.num_threads(n):
            runs.append(helpers.forward_backward(tri, _diff(inputs), _grad_out(inputs), mask=inputs["mask"],
                                                 impl="kernel")[1])
    for n, grads in zip(threads[1:], runs[1:]):
        for name in ("bias", "q", "k", "v"):
            assert torch.equal(grads[name], runs[0][name]), \
                f"grad {name} differs between runs ({threads[0]} and {n} threads)"


def test_gradcheck_fp64_cpu():
    inputs = _inputs("cpu", torch.float64, B=1, N=3, H=2, Q=9, K=11, D=16, masked_rows=[(0, 2)], seed=17)

    def fn(q, k, v, bias):
        return tri(q, k, v, bias, inputs["mask"], block_size=16, impl="kernel")

    with helpers.num_threads(1):
        assert torch.autograd.gradcheck(fn, tuple(_diff(inputs).values()), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_opcheck(device):
    """The kernel op on triangle-shaped arguments: rows folded into the batch, the bias shared by them."""
    helpers.require_device(device, OP)
    B, N, H, Q, D, bs = 1, 3, 2, 20, 16, 16
    inputs = _inputs(device, B=B, N=N, H=H, Q=Q, D=D, seed=21)
    layout = torch.ones(1, 2, 2, dtype=torch.bool, device=device)
    index = ops.layout_index(layout)
    fold = lambda t: t.detach().reshape(B * N, H, Q, D).requires_grad_()  # noqa: E731
    sample = (fold(inputs["q"]), fold(inputs["k"]), fold(inputs["v"]), *index, bs,
              inputs["mask"].reshape(B * N, Q), inputs["bias"].detach().squeeze(1).requires_grad_(), 0.25)
    helpers.assert_opcheck(torch.ops.af2_ext.block_sparse_attention_forward.default, [sample])


@pytest.mark.slow
@pytest.mark.parametrize("device", helpers.DEVICES)
def test_torch_compile(device):
    helpers.require_device(device, OP)
    torch._dynamo.reset()
    inputs = _inputs(device, B=1, N=3, H=2, Q=24, D=16, seed=23)

    def fn(q, k, v, bias):
        return tri(q, k, v, bias, inputs["mask"], block_size=16, impl="kernel")

    compiled = torch.compile(fn, fullgraph=True)
    grad_out = _grad_out(inputs)
    eager, eager_grads = helpers.forward_backward(fn, _diff(inputs), grad_out)
    out, grads = helpers.forward_backward(compiled, _diff(inputs), grad_out)
    helpers.assert_matches("compiled out vs eager", out, eager)
    for name in eager_grads:
        helpers.assert_matches(f"compiled grad {name} vs eager", grads[name], eager_grads[name], kind="grad")


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_reference_impl(device):
    """impl="reference" runs the block-sparse reference on the folded rows: the same values as the kernel."""
    helpers.require_device(device, OP)
    inputs = _inputs(device, seed=25)
    kernel = tri(inputs["q"], inputs["k"], inputs["v"], inputs["bias"], inputs["mask"], impl="kernel")
    ref = tri(inputs["q"], inputs["k"], inputs["v"], inputs["bias"], inputs["mask"], impl="reference")
    helpers.assert_matches("kernel vs impl=reference", kernel, ref)


# ----------------------------------------------------------------------------------------------------------
# Bad input: errors that name the argument
# ----------------------------------------------------------------------------------------------------------


def _bad(**changes):
    def build():
        inputs = _inputs("cpu", B=1, N=2, H=2, Q=20, D=16, seed=27)
        args = dict(q=inputs["q"], k=inputs["k"], v=inputs["v"], bias=inputs["bias"], mask=inputs["mask"])
        args.update({name: change(args) for name, change in changes.items()})
        return args
    return build


BAD_INPUTS = {
    "q_4d": (_bad(q=lambda a: a["q"][0]), ValueError, r"q must be \(B, N, H, Q, D\)"),
    "q_not_tensor": (_bad(q=lambda a: 1.0), TypeError, "q must be a torch.Tensor"),
    "k_heads": (_bad(k=lambda a: a["k"][:, :, :1]), ValueError, r"k must be \(B=1, N=2, H=2, K, D=16\)"),
    "v_shape": (_bad(v=lambda a: a["v"][:, :, :, :5]), ValueError, "v must have k's shape"),
    "bias_shape": (_bad(bias=lambda a: a["bias"][..., :5]), ValueError, r"bias must be \(B=1, 1, H=2, Q=20, K=20\)"),
    "bias_int": (_bad(bias=lambda a: a["bias"].detach().long()), ValueError, "bias must be a floating tensor"),
    "mask_float": (_bad(mask=lambda a: a["mask"].float()), ValueError, r"mask must be bool"),
    "mask_shape": (_bad(mask=lambda a: a["mask"][..., :5]), ValueError, r"mask must be \(B=1, N=2, 1, 1, K=20\)"),
    "head_dim": (_bad(q=lambda a: a["q"][..., :8], k=lambda a: a["k"][..., :8], v=lambda a: a["v"][..., :8]),
                 ValueError, r"head dim D \(q.size\(-1\)\) must be 16, 32, 64 or 128"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case):
    build, error, message = BAD_INPUTS[case]
    args = build()
    with pytest.raises(error, match=message):
        tri(args["q"], args["k"], args["v"], args["bias"], args["mask"], impl="kernel")


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_size=48), "block_size must be 16, 32, 64 or 128, got 48"),
    (dict(layout=torch.ones(1, 3, 3, dtype=torch.bool), block_size=16),
     r"layout must be \(1 or H=2, ceil\(Q/block_size\)=2, ceil\(K/block_size\)=2\)"),
    (dict(layout=torch.ones(1, 2, 2, dtype=torch.int32), block_size=16), "layout must be a bool tensor"),
])
def test_bad_options(kwargs, message):
    inputs = _inputs("cpu", B=1, N=2, H=2, Q=20, D=16, seed=29)
    with pytest.raises(ValueError, match=message):
        tri(inputs["q"], inputs["k"], inputs["v"], inputs["bias"], inputs["mask"], impl="kernel", **kwargs)
