"""Tests for af2_ext.reversible (ReversibleCouplings vs the same couplings through ordinary autograd) and the
fused coupling ops (af2_ext.ops.coupling_forward_ / coupling_backward_) against their PyTorch expressions.

The stack is the trunk's (af2_ext.blocks.trunk_couplings): pair halves (x1, x2) and MSA halves (m1, m2); per
layer pair self-attention (block-sparse op, key padding mask from the context), GEGLU feed-forwards, MSA row
attention (the MSA row structure comes from the context), and cross-attention both ways (compressed-attention
op), dropout everywhere.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import helpers
from af2_ext import ops
from af2_ext.blocks import FeedForward, trunk_couplings
from af2_ext.reversible import Coupling, ReversibleCouplings, SequentialCouplings

cuda_test = helpers.cuda_test("coupling_forward_")
DIM, HEADS, DIM_HEAD = 32, 2, 16


def trunk_blocks(depth: int, dropout: float = 0.1) -> list[list[Coupling]]:
    """Halves: 0, 1 = pair x1, x2; 2, 3 = MSA m1, m2 (af2_ext.blocks.trunk_couplings)."""
    return [trunk_couplings(DIM, heads=HEADS, dim_head=DIM_HEAD, dropout=dropout, ratio=2, block_size=16)
            for _ in range(depth)]


def _halves(device, *, msa: bool, seed: int = 0, dtype=torch.float32, B=2, N=20, rows=3, cols=24):
    x1, x2 = (helpers.randn(B, N, DIM, seed=seed + i, device=device, dtype=dtype, requires_grad=True)
              for i in range(2))
    m1 = m2 = None
    if msa:
        m1, m2 = (helpers.randn(B, rows * cols, DIM, seed=seed + 2 + i, device=device, dtype=dtype,
                                requires_grad=True) for i in range(2))
    mask = helpers.make_key_padding_mask(B, N, seed=seed + 10, keep=0.8, device=device)
    msa_mask = helpers.make_key_padding_mask(B, rows * cols, seed=seed + 11, keep=0.8, device=device)
    context = dict(mask=mask, msa_mask=msa_mask, msa_shape=(rows, cols))
    return (x1, x2, m1, m2), context


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _run(model, halves, context, seed):
    """Forward with a fixed RNG seed, a weighted sum as the loss, gradients of halves and parameters."""
    torch.manual_seed(seed)
    if any(h is not None and h.is_cuda for h in halves):
        torch.cuda.manual_seed_all(seed)
    out = model(*halves, **context)
    weights = [None if o is None else helpers.randn(*o.shape, seed=50 + i, device=o.device) for i, o in enumerate(out)]
    loss = sum((o * w).sum() for o, w in zip(out, weights) if o is not None)
    inputs = [h for h in halves if h is not None]
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, inputs + params, allow_unused=True)
    return out, grads


# ----------------------------------------------------------------------------------------------------------
# Gradients equal ordinary autograd (dropout on, same seed), with and without the MSA stream
# ----------------------------------------------------------------------------------------------------------


def _check_matches_autograd(device, msa):
    torch.manual_seed(0)
    blocks = trunk_blocks(depth=3, dropout=0.1)
    reversible = ReversibleCouplings(blocks, num_halves=4).to(device)
    sequential = SequentialCouplings(blocks, num_halves=4).to(device)  # the same modules
    halves, context = _halves(device, msa=msa)
    rev_out, rev_grads = _run(reversible, halves, context, seed=123)
    seq_out, seq_grads = _run(sequential, halves, context, seed=123)
    for i, (a, b) in enumerate(zip(rev_out, seq_out)):
        assert (a is None) == (b is None) == (halves[i] is None), f"half {i} presence"
        if a is not None:
            assert _relative(a, b) <= 1e-6, f"output half {i} differs by {_relative(a, b):.3g} (relative)"
    names = [f"half {i}" for i, h in enumerate(halves) if h is not None] + \
        [name for name, _ in reversible.named_parameters()]
    # Every parameter of an active coupling gets a gradient; those of skipped (MSA) couplings none.
    active = {id(p) for c in reversible.couplings if c.active(halves) for p in c.parameters()}
    expected = {f"half {i}" for i, h in enumerate(halves) if h is not None} | \
        {name for name, p in reversible.named_parameters() if id(p) in active}
    got = {name for name, a in zip(names, rev_grads) if a is not None}
    assert got == expected, f"gradients for {sorted(got ^ expected)} unexpected or missing"
    for name, a, b in zip(names, rev_grads, seq_grads):
        assert (a is None) == (b is None), f"{name}: gradient presence differs ({a is None} vs {b is None})"
        if a is not None:
            assert _relative(a, b) <= 1e-5, f"{name}: reversible gradient differs by {_relative(a, b):.3g} (relative)"


@pytest.mark.parametrize("msa", [True, False], ids=["with_msa", "pair_only"])
def test_matches_autograd_cpu(msa):
    _check_matches_autograd("cpu", msa)


@cuda_test
@pytest.mark.parametrize("msa", [True, False], ids=["with_msa", "pair_only"])
def test_matches_autograd_cuda(msa):
    _check_matches_autograd("cuda", msa)


def _check_dropout_replayed(device):
    """Dropout really is on (two seeds give different gradients), and the recompute replays it exactly."""
    torch.manual_seed(0)
    blocks = trunk_blocks(depth=2, dropout=0.5)
    reversible = ReversibleCouplings(blocks, num_halves=4).to(device)
    halves, context = _halves(device, msa=True, seed=3)
    _, a = _run(reversible, halves, context, seed=1)
    _, b = _run(reversible, halves, context, seed=2)
    assert _relative(a[0], b[0]) > 1e-2, "dropout had no effect: the test would not see a replay error"
    _, c = _run(reversible, halves, context, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, c) if x is not None), "same seed, different gradients"
    # The global RNG continues exactly as after an ordinary forward+backward (the replay is forked).
    torch.manual_seed(7)
    reversible(*halves, **context)[0].sum().backward()
    after_reversible = torch.rand(3, device=device)
    torch.manual_seed(7)
    SequentialCouplings(blocks, num_halves=4)(*halves, **context)[0].sum().backward()
    assert torch.equal(after_reversible, torch.rand(3, device=device)), "the backward disturbed the global RNG"


def test_dropout_replayed_cpu():
    _check_dropout_replayed("cpu")


@cuda_test
def test_dropout_replayed_cuda():
    _check_dropout_replayed("cuda")


def test_autocast_recompute_cpu():
    """The recompute runs under the forward's autocast (bf16 matmuls, fp32 halves)."""
    torch.manual_seed(0)
    blocks = [[Coupling(FeedForward(DIM, dropout=0.1), 0, [1]), Coupling(FeedForward(DIM, dropout=0.1), 1, [0])]
              for _ in range(3)]
    reversible, sequential = ReversibleCouplings(blocks, 2), SequentialCouplings(blocks, 2)
    halves = [helpers.randn(2, 8, DIM, seed=i, requires_grad=True) for i in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rev_out, rev_grads = _run(reversible, halves, {}, seed=5)
        seq_out, seq_grads = _run(sequential, halves, {}, seed=5)
    assert rev_out[0].dtype == torch.float32
    for a, b in zip(rev_grads, seq_grads):
        assert _relative(a, b) <= 1e-5, f"gradient differs by {_relative(a, b):.3g} under autocast"


# ----------------------------------------------------------------------------------------------------------
# Reconstruction drift and memory
# ----------------------------------------------------------------------------------------------------------


def _drift(device, dtype, depth=48):
    torch.manual_seed(0)
    model = ReversibleCouplings(trunk_blocks(depth, dropout=0.0), num_halves=4).to(device=device, dtype=dtype).eval()
    halves, context = _halves(device, msa=True, seed=4, dtype=dtype)
    halves = [h.detach() for h in halves]
    with torch.no_grad():
        out = model(*halves, **context)
    rebuilt = model.inverse(*out, **context)
    return max(_relative(r.float(), h.float()) for r, h in zip(rebuilt, halves))


def _check_drift(device):
    fp32 = _drift(device, torch.float32)
    assert fp32 < 1e-4, f"fp32 inputs rebuilt through 48 blocks drift by {fp32:.3g} (relative)"
    bf16 = _drift(device, torch.bfloat16)
    # bf16 storage rounds every coupling output (2^-8 relative); the fp32 inverse arithmetic keeps the drift
    # near that rounding instead of compounding it. Reported in BENCHMARKS.md via `bench reversible`.
    assert bf16 < 0.1, f"bf16 inputs rebuilt through 48 blocks drift by {bf16:.3g} (relative)"


def test_drift_cpu():
    _check_drift("cpu")


@cuda_test
def test_drift_cuda():
    _check_drift("cuda")


def saved_bytes(model, halves, context) -> int:
    """Bytes of the tensors autograd saves for the backward of one forward (distinct storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*halves, **context)
    return sum(storages.values())


def _check_memory_flat_in_depth(device):
    halves, context = _halves(device, msa=True, seed=5)
    ratios = {}
    for name, cls in (("reversible", ReversibleCouplings), ("sequential", SequentialCouplings)):
        torch.manual_seed(0)
        shallow = saved_bytes(cls(trunk_blocks(1), 4).to(device), halves, context)
        deep = saved_bytes(cls(trunk_blocks(12), 4).to(device), halves, context)
        ratios[name] = deep / shallow
    assert ratios["reversible"] <= 1.25, f"reversible saved bytes grow {ratios['reversible']:.2f}x from depth 1 to 12"
    assert 10 <= ratios["sequential"] <= 13, f"sequential grows {ratios['sequential']:.2f}x (expected about 12x)"


def test_memory_flat_in_depth_cpu():
    _check_memory_flat_in_depth("cpu")


@cuda_test
def test_memory_flat_in_depth_cuda():
    _check_memory_flat_in_depth("cuda")


@cuda_test
def test_peak_memory_training_step_cuda():
    """Peak max_memory_allocated of a training step: flat in depth when reversible."""
    device = "cuda"
    halves, context = _halves(device, msa=True, seed=6, B=2, N=64, rows=4, cols=64)
    peaks = {}
    for depth in (1, 8):
        torch.manual_seed(0)
        model = ReversibleCouplings(trunk_blocks(depth), 4).to(device)
        params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(model, halves, context, seed=1)
        torch.cuda.synchronize()
        peaks[depth] = torch.cuda.max_memory_allocated() - base - 2 * params_bytes  # minus weights' grads
        del model
    assert peaks[8] <= 1.25 * peaks[1], f"reversible peak grows from {peaks[1]} to {peaks[8]} bytes"


# ----------------------------------------------------------------------------------------------------------
# API errors
# ----------------------------------------------------------------------------------------------------------


def test_api_errors():
    ff = FeedForward(DIM)
    with pytest.raises(ValueError, match="reads its own target half 0"):
        ReversibleCouplings([Coupling(ff, 0, [0, 1])], num_halves=2)
    with pytest.raises(ValueError, match="refers to half 2, but there are 2 halves"):
        ReversibleCouplings([Coupling(ff, 0, [2])], num_halves=2)
    model = ReversibleCouplings([Coupling(ff, 0, [1])], num_halves=2)
    x = torch.randn(2, 3, DIM, requires_grad=True)
    with pytest.raises(ValueError, match="expected 2 halves"):
        model(x)
    with pytest.raises(ValueError, match="every half is None"):
        model(None, None)
    with pytest.raises(ValueError, match="context argument 'bias' requires grad"):
        model(x, x, bias=torch.ones(1, requires_grad=True))
    bad = ReversibleCouplings([Coupling(nn.Linear(DIM, 2 * DIM), 0, [1])], num_halves=2)
    with pytest.raises(RuntimeError, match=r"returned shape \(2, 3, 64\) for target half 0 of shape \(2, 3, 32\)"):
        bad(x, x)


def test_no_grad_forward_matches():
    torch.manual_seed(0)
    model = ReversibleCouplings(trunk_blocks(2, dropout=0.0), 4).eval()
    halves, context = _halves("cpu", msa=True, seed=8)
    with torch.no_grad():
        a = model(*halves, **context)
    b = model(*halves, **context)
    for x, y in zip(a, b):
        assert torch.equal(x, y.detach()), "no-grad path and autograd path disagree"
    assert all(not x.requires_grad for x in a)


# ----------------------------------------------------------------------------------------------------------
# Fused coupling ops vs their PyTorch expressions
# ----------------------------------------------------------------------------------------------------------

COUPLING_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                   (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)]


def _check_coupling_ops(device, dtype, src_dtype):
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    for n in (1, 7, 1000, 100_003):
        x = helpers.randn(n, seed=1, dtype=dtype, device=device)
        f = helpers.randn(n, seed=2, dtype=src_dtype, device=device)
        expected = (x.to(opmath) + f.to(opmath)).to(dtype)
        y = x.clone()
        assert ops.coupling_forward_(y, f, impl="kernel") is y
        assert torch.equal(y, expected), f"n={n}: x += f differs from the PyTorch expression"
        grad = helpers.randn(2, n // 2 + 1, seed=3, dtype=dtype, device=device)  # another shape than y
        vjp = helpers.randn(2, n // 2 + 1, seed=4, dtype=src_dtype, device=device)
        expected_grad = (grad.to(opmath) + vjp.to(opmath)).to(dtype)
        expected_y = (y.to(opmath) - f.to(opmath)).to(dtype)
        ops.coupling_backward_(y, f, grad, vjp, impl="kernel")
        assert torch.equal(y, expected_y), f"n={n}: y -= f differs from the PyTorch expression"
        assert torch.equal(grad, expected_grad), f"n={n}: grad += vjp differs from the PyTorch expression"
        # The same through the reference path (impl="reference"): identical by construction of the rule.
        y_ref = expected.clone()
        ops.coupling_backward_(y_ref, f, grad.clone(), vjp, impl="reference")
        assert torch.equal(y_ref, expected_y)


@pytest.mark.parametrize("dtype, src_dtype", COUPLING_DTYPES + [(torch.float64, torch.float64)], ids=str)
def test_coupling_ops_cpu(dtype, src_dtype):
    _check_coupling_ops("cpu", dtype, src_dtype)


@cuda_test
@pytest.mark.parametrize("dtype, src_dtype", COUPLING_DTYPES, ids=str)
def test_coupling_ops_cuda(dtype, src_dtype):
    _check_coupling_ops("cuda", dtype, src_dtype)


def _check_coupling_bad_input(device):
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


def test_coupling_bad_input_cpu():
    _check_coupling_bad_input("cpu")


@cuda_test
def test_coupling_bad_input_cuda():
    _check_coupling_bad_input("cuda")


class _NormedFeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x):  # x: [b, n, d]
        return self.ff(self.norm(x.transpose(1, 2)).transpose(1, 2))


def test_batchnorm_running_stats_updated_once():
    """The backward's recompute must not update BatchNorm's running statistics a second time: after one training
    step they equal those of ordinary autograd."""
    torch.manual_seed(0)
    blocks = [[Coupling(_NormedFeedForward(DIM), 0, [1]), Coupling(_NormedFeedForward(DIM), 1, [0])]]
    seq = SequentialCouplings(blocks, num_halves=2)
    rev = ReversibleCouplings(blocks, num_halves=2)
    x1, x2 = (torch.randn(4, 6, DIM, requires_grad=True) for _ in range(2))
    state = {k: v.clone() for k, v in seq.state_dict().items()}
    torch.cat(seq(x1, x2), -1).square().sum().backward()
    want = {k: v.clone() for k, v in seq.state_dict().items()}
    rev.load_state_dict(state)  # the same modules: start from the statistics before the step
    torch.cat(rev(x1, x2), -1).square().sum().backward()
    for name, value in rev.state_dict().items():
        if "running" in name or "num_batches" in name:
            assert torch.allclose(value, want[name], atol=1e-6), f"{name}: {value} vs autograd's {want[name]}"


def test_double_backward_refused():
    model = ReversibleCouplings([Coupling(FeedForward(DIM), 0, [1])], num_halves=2)
    x = torch.randn(2, 3, DIM, requires_grad=True)
    y1, y2 = model(x, x * 2)
    with pytest.raises(RuntimeError, match="ReversibleCouplings: second-order gradients"):
        torch.autograd.grad((y1 + y2).square().sum(), x, create_graph=True)
