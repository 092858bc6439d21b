"""Tests for the fused coupling ops of reversible recompute, af2_ext.ops.coupling_forward_ (``x += f``) and
coupling_backward_ (``y -= f`` with ``grad += vjp``), against af2_ext.reference.coupling_forward_ref /
coupling_backward_ref: in place, fp32 arithmetic for fp16/bf16 storage, rounded once.

Each test is written once and parametrised by device (``helpers.per_device`` where the devices run different
cases: fp64 is CPU-only); a CUDA case skips, with the reason, without CUDA or without a CUDA kernel.
"""
from __future__ import annotations

import pytest
import torch

import helpers
from af2_ext import ops, reference

OP = "coupling_forward_"

# (buffer dtype, source dtype): the source in the buffer's dtype, or a wider / narrower one, never rounded first.
COUPLING_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                   (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)]
# fp64 is CPU-only: the CUDA kernels run fp32, fp16 and bf16.
DEVICE_DTYPES = helpers.per_device(cpu=COUPLING_DTYPES + [(torch.float64, torch.float64)], cuda=COUPLING_DTYPES)
SIZES = (1, 7, 1000, 100_003)  # a single element, a tail shorter than a vector, many blocks with a tail


@pytest.mark.parametrize("device, dtype, src_dtype", DEVICE_DTYPES)
def test_kernel_matches_reference(device, dtype, src_dtype):
    helpers.require_device(device, OP)
    for n in SIZES:
        x = helpers.randn(n, seed=1, dtype=dtype, device=device)
        f = helpers.randn(n, seed=2, dtype=src_dtype, device=device)
        y = x.clone()
        assert ops.coupling_forward_(y, f, impl="kernel") is y, "coupling_forward_ must return its buffer"
        expected = reference.coupling_forward_ref(x.clone(), f)
        assert torch.equal(y, expected), f"n={n}: x += f differs from the reference"

        grad = helpers.randn(2, n // 2 + 1, seed=3, dtype=dtype, device=device)  # another shape than y
        vjp = helpers.randn(2, n // 2 + 1, seed=4, dtype=src_dtype, device=device)
        y_ref, grad_ref = y.clone(), grad.clone()
        reference.coupling_backward_ref(y_ref, f, grad_ref, vjp)
        assert ops.coupling_backward_(y, f, grad, vjp, impl="kernel") is None
        assert torch.equal(y, y_ref), f"n={n}: y -= f differs from the reference"
        assert torch.equal(grad, grad_ref), f"n={n}: grad += vjp differs from the reference"


@pytest.mark.parametrize("device, dtype, src_dtype", DEVICE_DTYPES)
def test_reference_path_runs_the_reference(device, dtype, src_dtype, monkeypatch):
    """impl="reference" calls reference.coupling_*_ref (and gives its values) on every device."""
    helpers.require_device(device)
    calls = []
    for name in ("coupling_forward_ref", "coupling_backward_ref"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *args, _real=real, _name=name: calls.append(_name) or _real(*args))
    x = helpers.randn(33, seed=5, dtype=dtype, device=device)
    f = helpers.randn(33, seed=6, dtype=src_dtype, device=device)
    grad = helpers.randn(3, 11, seed=7, dtype=dtype, device=device)
    vjp = helpers.randn(3, 11, seed=8, dtype=src_dtype, device=device)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    y = ops.coupling_forward_(x.clone(), f, impl="reference")
    assert torch.equal(y, (x.to(opmath) + f.to(opmath)).to(dtype))
    new_grad = grad.clone()
    ops.coupling_backward_(y, f, new_grad, vjp, impl="reference")
    assert torch.equal(new_grad, (grad.to(opmath) + vjp.to(opmath)).to(dtype))
    assert calls == ["coupling_forward_ref", "coupling_backward_ref"], calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_rounds_once(dtype):
    """The contract the reference pins: an fp32 source is added in fp32 and the sum rounded once, which differs
    from rounding the source to the buffer's dtype first (so the kernels' match above means something)."""
    x = helpers.randn(4096, seed=9, dtype=dtype)
    f = helpers.randn(4096, seed=10, scale=1e-2)  # fp32
    y = reference.coupling_forward_ref(x.clone(), f)
    assert torch.equal(y, (x.float() + f).to(dtype))
    assert not torch.equal(y, x + f.to(dtype)), "rounding f first gives the same sums: the test is vacuous"
    rebuilt, grad = y.clone(), torch.zeros(4096, dtype=dtype)
    reference.coupling_backward_ref(rebuilt, f, grad, f)
    assert torch.equal(rebuilt, (y.float() - f).to(dtype)) and torch.equal(grad, f.to(dtype))


def _opcheck_samples(op: str, device) -> list[tuple]:
    """Fresh tensors for every sample: the ops write their buffers in place."""
    def t(*shape, seed, dtype=torch.float32):
        return helpers.randn(*shape, seed=seed, dtype=dtype, device=device)

    if op == "coupling_forward_":
        x = t(6, seed=5)
        return [(t(7, 5, seed=1), t(7, 5, seed=2)),
                (t(1000, seed=3, dtype=torch.bfloat16), t(1000, seed=4)),  # an fp32 source for bf16 storage
                (x, x)]  # its own source
    return [(t(7, 5, seed=1), t(7, 5, seed=2), t(3, 4, seed=3), t(3, 4, seed=4)),
            (t(1000, seed=5, dtype=torch.float16), t(1000, seed=6), t(10, 3, seed=7, dtype=torch.bfloat16),
             t(10, 3, seed=8, dtype=torch.bfloat16))]


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("op", ["coupling_forward_", "coupling_backward_"])
def test_opcheck(device, op):
    helpers.require_device(device, op)
    helpers.assert_opcheck(getattr(torch.ops.af2_ext, op).default, _opcheck_samples(op, device))


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_bad_input(device):
    helpers.require_device(device, OP)
    x = torch.zeros(4, 5, device=device)
    with pytest.raises((ValueError, RuntimeError), match=r"f must have x's shape"):
        ops.coupling_forward_(x, torch.zeros(5, device=device), impl="kernel")
    with pytest.raises((ValueError, RuntimeError), match=r"x must be contiguous"):
        ops.coupling_forward_(x.t(), torch.zeros(5, 4, device=device), impl="kernel")
    with pytest.raises((ValueError, RuntimeError), match=r"x must be float32, float16 or bfloat16"):
        ops.coupling_forward_(x.int(), x.int(), impl="kernel")
    with pytest.raises((ValueError, RuntimeError), match=r"f must have x's dtype"):
        ops.coupling_forward_(x, x.double(), impl="kernel")
    with pytest.raises((ValueError, RuntimeError), match=r"f must be on x's device"):
        ops.coupling_forward_(x, x.to(helpers.other_device(device)), impl="kernel")
    with pytest.raises((ValueError, RuntimeError), match=r"y must not overlap grad"):
        ops.coupling_backward_(x, x.clone(), x, x.clone(), impl="kernel")
    # Overlapping views, not only the same tensor: each check in the op wrapper and in the binding alone.
    buf = torch.zeros(2, 4, 5, device=device)
    overlapping = [
        ("coupling_backward_", (buf[0], x.clone(), buf.view(8, 5)[2:6], x.clone()), r"y must not overlap grad"),
        ("coupling_backward_", (buf.view(8, 5)[:4], buf.view(8, 5)[1:5], x.clone(), x.clone()),
         r"f must not partially overlap y"),
        ("coupling_backward_", (x.clone(), x.clone(), buf.view(8, 5)[:4], buf.view(8, 5)[2:6]),
         r"vjp must not partially overlap grad"),
        ("coupling_backward_", (buf[0], x.clone(), buf[1], buf[0]), r"vjp must not overlap y"),
        ("coupling_backward_", (buf[0], buf[1], buf[1], x.clone()), r"f must not overlap grad"),
        ("coupling_forward_", (buf.view(8, 5)[:4], buf.view(8, 5)[1:5]), r"f must not partially overlap x"),
    ]
    for name, args, message in overlapping:
        with pytest.raises((ValueError, RuntimeError), match=message):
            getattr(ops, name)(*args, impl="kernel")
        with pytest.raises(RuntimeError, match=message):
            getattr(torch.ops.af2_ext, name)(*args)
    # Each buffer may be its own source (an element-wise update).
    y = torch.ones(4, 5, device=device)
    ops.coupling_forward_(y, y, impl="kernel")
    assert torch.equal(y, torch.full_like(y, 2.0))
    with pytest.raises((ValueError, RuntimeError), match=r"vjp must have grad's shape"):
        ops.coupling_backward_(x, x.clone(), x.clone(), torch.zeros(3, device=device), impl="kernel")
    # The C++ bindings check the same without the Python wrapper.
    with pytest.raises(RuntimeError, match=r"f must have x's shape"):
        torch.ops.af2_ext.coupling_forward_(x, torch.zeros(5, device=device))
