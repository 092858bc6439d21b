"""Tests for af2_ext.reversible: ReversibleCouplings vs the same couplings through ordinary autograd (the fused
coupling ops it runs on are tested in test_coupling.py).

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
from af2_ext.blocks import FeedForward, trunk_couplings
from af2_ext.reversible import Coupling, ReversibleCouplings, SequentialCouplings

OP = "coupling_forward_"
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


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("msa", [True, False], ids=["with_msa", "pair_only"])
def test_matches_autograd(device, msa):
    helpers.require_device(device, OP)
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


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_dropout_replayed(device):
    """Dropout really is on (two seeds give different gradients), and the recompute replays it exactly."""
    helpers.require_device(device, OP)
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


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_drift(device):
    helpers.require_device(device, OP)
    fp32 = _drift(device, torch.float32)
    assert fp32 < 1e-4, f"fp32 inputs rebuilt through 48 blocks drift by {fp32:.3g} (relative)"
    bf16 = _drift(device, torch.bfloat16)
    # bf16 storage rounds every coupling output (2^-8 relative); the fp32 inverse arithmetic keeps the drift
    # near that rounding instead of compounding it. Reported in BENCHMARKS.md via `bench reversible`.
    assert bf16 < 0.1, f"bf16 inputs rebuilt through 48 blocks drift by {bf16:.3g} (relative)"


def saved_bytes(model, halves, context) -> int:
    """Bytes of the tensors autograd saves for the backward of one forward (distinct storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*halves, **context)
    return sum(storages.values())


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_memory_flat_in_depth(device):
    helpers.require_device(device, OP)
    halves, context = _halves(device, msa=True, seed=5)
    ratios = {}
    for name, cls in (("reversible", ReversibleCouplings), ("sequential", SequentialCouplings)):
        torch.manual_seed(0)
        shallow = saved_bytes(cls(trunk_blocks(1), 4).to(device), halves, context)
        deep = saved_bytes(cls(trunk_blocks(12), 4).to(device), halves, context)
        ratios[name] = deep / shallow
    assert ratios["reversible"] <= 1.25, f"reversible saved bytes grow {ratios['reversible']:.2f}x from depth 1 to 12"
    assert 10 <= ratios["sequential"] <= 13, f"sequential grows {ratios['sequential']:.2f}x (expected about 12x)"


def test_peak_memory_training_step_cuda():
    """Peak max_memory_allocated of a training step: flat in depth when reversible."""
    helpers.require_device("cuda", OP)
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


def test_backward_hands_freed_host_memory_back_once_per_coupling(monkeypatch):
    """trim_host_memory=True calls the heap trim after every coupling's backward (False never), and the
    gradients are the same either way (the benchmark measures the resident-memory effect)."""
    import af2_ext.reversible as rev

    calls = []
    monkeypatch.setattr(rev, "_release_host_memory", lambda halves: calls.append(len(halves)))
    grads = {}
    for trim in (True, False):
        torch.manual_seed(0)
        f, g = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        seq = rev.ReversibleCouplings([[rev.Coupling(f, 0, [1]), rev.Coupling(g, 1, [0])]], 2, trim_host_memory=trim)
        x = torch.randn(3, 8, requires_grad=True)
        y1, y2 = seq(x, x)
        grads[trim] = torch.autograd.grad((y1 * 2 + y2).sum(), [x, *seq.parameters()])
        if trim:
            assert calls == [2, 2], calls
    assert calls == [2, 2], calls
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
