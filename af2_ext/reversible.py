"""Reversible recompute (RevNet, Gomez et al. 2017): a trunk whose activation memory does not grow with depth.

The state is a tuple of *halves* (tensors); the trunk has four, the two halves of the pair stream ``x`` and of
the MSA stream ``m``. A :class:`Coupling` adds a function of some halves to another one,
``halves[target] += fn(*halves[inputs], **context)``, and never reads its own target, so it can be undone:
``halves[target] -= fn(*halves[inputs])``. A block is a list of couplings; the seed's layer is

    x1 += f(x2)   x2 += g(x1)   m1 += j(m2)   m2 += k(m1)          (and cross blocks whose f reads m2, ...)

:class:`ReversibleCouplings` runs the couplings under one autograd function that stores only the final halves
(and each coupling's 8-byte generator seed); its backward walks the couplings in reverse: recompute ``fn`` with grad
enabled and the forward's generator seed and autocast state replayed, rebuild the target in place, back-propagate, free. Memory is
one set of halves plus one coupling's activations, whatever the depth. :class:`SequentialCouplings` runs the
same couplings through ordinary autograd (every activation stored); the trunk switches with one flag.

The coupling arithmetic runs in the fused kernels ``af2_ext.ops.coupling_forward_`` (``y = x + f``, in place)
and ``coupling_backward_`` (``x = y - f`` and ``grad_other += vjp`` in one pass), fp32 arithmetic for fp16/bf16
storage.

Deliberate differences from the seed (alphafold2-pytorch 0.0.19): any number of streams, with or without the
MSA (absent halves are ``None`` and the couplings that touch them are skipped); the per-call ``context``
(masks, the MSA row structure) is passed identically to the forward and to the recompute, where the seed's
recompute dropped the MSA shape; parameters get their gradients through autograd (``torch.autograd.grad`` and
hooks see them), not by a side-effect ``backward`` call.

The seed module's names (``alphafold2_pytorch.reversible``) are here too, on this machinery: :class:`Deterministic`,
:class:`ReversibleSelfAttnBlock` and :class:`ReversibleCrossAttnBlock` (four functions f, g, j, k, each block a
list of couplings) and :class:`ReversibleSequence` (the seed's trunk; ``reverse=True`` runs
:class:`ReversibleCouplings`, ``reverse=False`` :class:`SequentialCouplings`, over the same parameters).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states

from af2_ext import ops

Halves = tuple[Optional[torch.Tensor], ...]


class Coupling(nn.Module):
    """``halves[target] += fn(*(halves[i] for i in inputs), **context)``.

    Args:
        fn: a module (its parameters are trained through the coupling). Must return a tensor of the target's
            shape, and be deterministic given the RNG state (dropout is).
        target: index of the half it updates.
        inputs: indices of the halves it reads. A coupling that reads its own target is an ordinary residual
            (``x = x + fn(x)``): fine in a :class:`SequentialCouplings`, rejected by :class:`ReversibleCouplings`
            because it cannot be undone.
    """

    def __init__(self, fn: nn.Module, target: int, inputs: Sequence[int]):
        super().__init__()
        inputs = tuple(int(i) for i in inputs)
        if not inputs:
            raise ValueError("a coupling needs at least one input half")
        self.fn, self.target, self.inputs = fn, int(target), inputs

    def extra_repr(self) -> str:
        return f"target={self.target}, inputs={self.inputs}"

    def active(self, halves: Halves) -> bool:
        """False when a half it touches is absent (None): e.g. the MSA couplings of a call without an MSA."""
        return halves[self.target] is not None and all(halves[i] is not None for i in self.inputs)

    def compute(self, halves: Halves, context: dict) -> torch.Tensor:
        out = self.fn(*(halves[i] for i in self.inputs), **context)
        target = halves[self.target]
        if out.shape != target.shape:
            raise RuntimeError(f"coupling {self.fn.__class__.__name__} returned shape {tuple(out.shape)} for target "
                               f"half {self.target} of shape {tuple(target.shape)}")
        return out


def _working_copy(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A contiguous copy the couplings may update in place (one copy, whatever t's layout)."""
    return None if t is None else torch.clone(t.detach(), memory_format=torch.contiguous_format)


def _couplings(blocks: Iterable) -> list[Coupling]:
    flat = []
    for block in blocks:
        if isinstance(block, Coupling):
            flat.append(block)
        else:
            flat.extend(_couplings(block))
    return flat


def _check_halves(halves: Sequence, num_halves: int) -> None:
    if len(halves) != num_halves:
        raise ValueError(f"expected {num_halves} halves (None for an absent one), got {len(halves)}")
    present = [h for h in halves if h is not None]
    if not present:
        raise ValueError("every half is None")
    for i, h in enumerate(halves):
        if h is not None and not isinstance(h, torch.Tensor):
            raise TypeError(f"half {i} must be a tensor or None, got {type(h).__name__}")
        if h is not None and h.device != present[0].device:
            raise ValueError(f"half {i} is on {h.device}, half 0 on {present[0].device}")


def _check_context(context: dict) -> None:
    for name, value in context.items():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise ValueError(f"context argument {name!r} requires grad: the per-call context is not "
                             "differentiated through the reversible recompute; pass it as a half instead")


class _Sequence(nn.Module):
    def __init__(self, blocks: Iterable, num_halves: int, *, seed_couplings: bool = True):
        super().__init__()
        self.couplings = nn.ModuleList(_couplings(blocks))
        self.num_halves = int(num_halves)
        self.seed_couplings = seed_couplings
        for c in self.couplings:
            bad = [i for i in (c.target, *c.inputs) if not 0 <= i < self.num_halves]
            if bad:
                raise ValueError(f"coupling {c} refers to half {bad[0]}, but there are {self.num_halves} halves")


    def _seeded(self) -> bool:
        """Whether couplings get their own seeds this call. Seeds only matter where something may be random (a
        module in training mode); drawing one is a host read torch.compile cannot trace, so compiled or
        all-eval sequences run their couplings on the global generators."""
        if not self.seed_couplings or torch.compiler.is_compiling():
            return False
        return any(m.training for m in self.couplings.modules())


class SequentialCouplings(_Sequence):
    """The couplings run through ordinary autograd (every activation stored). Same interface as
    :class:`ReversibleCouplings`.

    Args:
        blocks: couplings, or lists of couplings (one list per block).
        num_halves: the number of halves of the state.
        seed_couplings: as :class:`ReversibleCouplings`; the same global seed gives the same dropout masks here
            and there.
    """

    def forward(self, *halves: Optional[torch.Tensor], **context: Any) -> Halves:
        _check_halves(halves, self.num_halves)
        state = list(halves)
        devices = _cuda_devices(halves)
        seeded = self._seeded()
        for c in self.couplings:
            if c.active(state):
                with _seeded(_draw_seed() if seeded else None, devices):
                    out = c.compute(tuple(state), context)
                state[c.target] = state[c.target] + out
        return tuple(state)


# ----------------------------------------------------------------------------------------------------------
# Randomness: each coupling runs on its own generator seed, drawn from the global CPU generator before it runs
# and replayed in its recompute (8 bytes a coupling instead of a 5 KB generator state). SequentialCouplings
# draws the same seeds, so both give bit-identical dropout masks for the same global seed.
# ----------------------------------------------------------------------------------------------------------


def _cuda_devices(halves: Halves) -> list[int]:
    return sorted({h.device.index if h.device.index is not None else torch.cuda.current_device()
                   for h in halves if h is not None and h.device.type == "cuda"})


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


@contextlib.contextmanager
def _seeded(seed: Optional[int], devices: list[int]):
    """Run with the CPU generator and the CUDA generators of ``devices`` seeded with ``seed``; every generator
    is restored afterwards. ``seed=None``: no change."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for device in devices:
            torch.cuda.default_generators[device].manual_seed(seed)
        yield


def _capture_autocast() -> list[tuple[str, bool, torch.dtype]]:
    return [(device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")]


@contextlib.contextmanager
def _replay_autocast(state: list[tuple[str, bool, torch.dtype]]):
    """The forward's autocast settings around the recompute (backward runs outside the caller's autocast)."""
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype in state:
            if enabled or torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


@contextlib.contextmanager
def _running_stats_kept(fn: nn.Module):
    """The recompute is the forward run a second time: running statistics that modules update in training mode
    (BatchNorm, InstanceNorm with track_running_stats) are restored afterwards, so that each step updates them
    once, as in ordinary autograd."""
    norms = [m for m in fn.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
             and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
             for m in norms]
    try:
        yield
    finally:
        for m, buffers in zip(norms, saved):
            live = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
            for b, old in zip(live, buffers):
                b.copy_(old)


_recompute_depth = 0


@contextlib.contextmanager
def _recomputing():
    global _recompute_depth
    _recompute_depth += 1
    try:
        yield
    finally:
        _recompute_depth -= 1


def recomputing() -> bool:
    """True while a reversible backward recomputes a coupling's function: its graph is differentiated at once and
    freed, so modules need not save less for a later backward (e.g. checkpoint their own activations)."""
    return _recompute_depth > 0


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another OS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _release_host_memory(halves: Halves) -> None:
    """Return the host heap's free pages to the OS (glibc ``malloc_trim(0)``) when the halves live in host
    memory. Each coupling's recompute frees tensors of many sizes; glibc keeps the freed memory mapped
    (fragmented heap, adaptive mmap threshold), so without this the resident set of a reversible backward grows
    with depth although the live tensors do not (dim 64, n 96: step peak +43 MB at depth 1, +398 MB at depth 12;
    with it, 100 MB and 115 MB)."""
    trim = _malloc_trim()
    if trim is not None and any(h is not None and h.device.type == "cpu" for h in halves):
        trim(0)


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sequence: "ReversibleCouplings", context: dict, present: tuple, *args):
        num = len(present)
        inputs, params = args[:num], args[num:]
        state: list = [None] * sequence.num_halves
        for slot, h in zip(present, inputs):
            state[slot] = _working_copy(h)  # the working buffers the couplings update in place
        devices = _cuda_devices(tuple(state))
        seeds = sequence._run(state, context, devices)
        outputs = tuple(state[slot] for slot in present)
        ctx.sequence, ctx.context, ctx.present, ctx.devices, ctx.seeds = sequence, context, present, devices, seeds
        ctx.autocast = _capture_autocast()
        ctx.param_index = {id(p): i for i, p in enumerate(params)}
        ctx.num_params = len(params)
        ctx.save_for_backward(*outputs)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if torch.is_grad_enabled():  # create_graph=True: the recompute below is not differentiated twice
            raise RuntimeError("ReversibleCouplings: second-order gradients (create_graph=True) are not supported; "
                               "use SequentialCouplings (ordinary autograd) for double backward")
        sequence, context, present = ctx.sequence, ctx.context, ctx.present
        saved = ctx.saved_tensors
        state: list = [None] * sequence.num_halves
        grads: list = [None] * sequence.num_halves
        for slot, out, g in zip(present, saved, grad_outputs):
            state[slot] = _working_copy(out)  # rebuilt in place below; the caller's outputs stay intact
            grads[slot] = torch.zeros_like(out) if g is None else _working_copy(g)
        param_grads: list = [None] * ctx.num_params
        for c, seed in zip(reversed(sequence.couplings), reversed(ctx.seeds)):
            if not c.active(state):
                continue
            leaves = [state[i].detach().requires_grad_() for i in c.inputs]
            view = list(state)
            for i, leaf in zip(c.inputs, leaves):
                view[i] = leaf
            params = [p for p in c.fn.parameters() if id(p) in ctx.param_index]
            with _running_stats_kept(c.fn):  # restored after the vjp, which reads them
                with torch.enable_grad(), _seeded(seed, ctx.devices), _replay_autocast(ctx.autocast), \
                        _recomputing():
                    out = c.compute(tuple(view), context)
                vjp = torch.autograd.grad(out, leaves + params, grads[c.target], allow_unused=True)
            out = out.detach()
            # Fused: rebuild the target's input (y - f) and accumulate the first input's gradient.
            first = vjp[0] if vjp[0] is not None else torch.zeros_like(grads[c.inputs[0]])
            ops.coupling_backward_(state[c.target], out, grads[c.inputs[0]], first)
            for i, g in zip(c.inputs[1:], vjp[1:len(leaves)]):
                if g is not None:
                    ops.coupling_forward_(grads[i], g)
            for p, g in zip(params, vjp[len(leaves):]):
                if g is not None:
                    k = ctx.param_index[id(p)]
                    param_grads[k] = g if param_grads[k] is None else param_grads[k] + g
            del leaves, view, out, vjp
            if sequence.trim_host_memory:
                _release_host_memory(tuple(state))
        return (None, None, None, *(grads[slot] for slot in present), *param_grads)


class ReversibleCouplings(_Sequence):
    """Reversible couplings: activation memory independent of depth (one extra forward in the backward).

    Args:
        blocks: couplings, or lists of couplings (one list per block), applied in order.
        num_halves: the number of halves of the state.
        seed_couplings: run each coupling on its own generator seed, drawn from the global CPU generator, and
            replay it in the recompute, so dropout masks are bit-identical (default True; False runs the
            functions on the global generators and the recompute of a random function is not exact).
        trim_host_memory: after each coupling's backward on host (CPU) tensors, hand the heap's free pages back
            to the OS (glibc ``malloc_trim``; no-op elsewhere), so the step's peak resident memory stays flat in
            depth (default True).

    Call with the halves (``None`` for an absent one) and keyword context passed to every coupling's function
    (masks, shapes; not differentiated). Returns the new halves. Outside autograd (no input or parameter
    requires grad, or grad disabled) it runs the couplings directly, in place on copies of the halves.
    """

    def __init__(self, blocks: Iterable, num_halves: int, *, seed_couplings: bool = True,
                 trim_host_memory: bool = True):
        super().__init__(blocks, num_halves, seed_couplings=seed_couplings)
        self.trim_host_memory = trim_host_memory
        for c in self.couplings:
            if c.target in c.inputs:
                raise ValueError(f"coupling {c.fn.__class__.__name__} reads its own target half {c.target} "
                                 f"(inputs {c.inputs}): a residual x = x + f(x) cannot be undone; use "
                                 "SequentialCouplings or make it read another half")

    def _run(self, state: list, context: dict, devices: list[int]) -> list[Optional[int]]:
        """The forward, in place on ``state`` without autograd; returns each coupling's seed (None: skipped or
        unseeded)."""
        seeds = []
        seeded = self._seeded()
        with torch.no_grad():
            for c in self.couplings:
                seed = _draw_seed() if c.active(state) and seeded else None
                seeds.append(seed)
                if c.active(state):
                    with _seeded(seed, devices):
                        out = c.compute(tuple(state), context)
                    ops.coupling_forward_(state[c.target], out)
        return seeds

    def forward(self, *halves: Optional[torch.Tensor], **context: Any) -> Halves:
        _check_halves(halves, self.num_halves)
        _check_context(context)
        present = tuple(i for i, h in enumerate(halves) if h is not None)
        params = tuple(p for p in self.parameters() if p.requires_grad)
        needs_grad = torch.is_grad_enabled() and (any(halves[i].requires_grad for i in present) or params)
        if not needs_grad:
            state = [_working_copy(h) for h in halves]
            self._run(state, context, _cuda_devices(halves))
            return tuple(state)
        outputs = _ReversibleFunction.apply(self, context, present, *(halves[i] for i in present), *params)
        state: list = [None] * self.num_halves
        for slot, out in zip(present, outputs):
            state[slot] = out
        return tuple(state)

    @torch.no_grad()
    def inverse(self, *halves: Optional[torch.Tensor], **context: Any) -> Halves:
        """Rebuild the inputs from the outputs by undoing the couplings in reverse order, as the backward does
        (for measuring reconstruction drift). The couplings' functions must be deterministic here: eval mode,
        or no dropout."""
        _check_halves(halves, self.num_halves)
        state = [_working_copy(h) for h in halves]
        for c in reversed(self.couplings):
            if c.active(state):
                # y + (-f) is y - f exactly (negation is exact), computed like the backward's inverse.
                ops.coupling_forward_(state[c.target], c.compute(tuple(state), context).neg())
        return tuple(state)


# ----------------------------------------------------------------------------------------------------------
# The seed's names (alphafold2_pytorch.reversible): its blocks of four functions, run as couplings above.
# ----------------------------------------------------------------------------------------------------------


class Deterministic(nn.Module):
    """``net`` with its generator states recorded (``record_rng=True``: the CPU generator's, and the CUDA
    generators' of the devices of the tensor arguments once CUDA is initialised) and replayed (``set_rng=True``:
    ``net`` runs on the recorded states, the caller's are restored afterwards), so that a recompute draws the
    same dropout masks. The seed's class; its trunk here runs through :class:`ReversibleSequence`, which seeds
    the couplings itself."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.cpu_state = None
        self.cuda_in_fwd = False
        self.gpu_devices, self.gpu_states = [], []

    def record_rng(self, *args) -> None:
        self.cpu_state = torch.get_rng_state()
        self.cuda_in_fwd = torch.cuda.is_initialized()
        if self.cuda_in_fwd:
            self.gpu_devices, self.gpu_states = get_device_states(*args)

    def forward(self, *args, record_rng: bool = False, set_rng: bool = False, **kwargs):
        if record_rng:
            self.record_rng(*args)
        if not set_rng:
            return self.net(*args, **kwargs)
        if self.cpu_state is None:
            raise RuntimeError("Deterministic: set_rng=True needs a previous call with record_rng=True")
        devices = self.gpu_devices if self.cuda_in_fwd else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_in_fwd:
                set_device_states(self.gpu_devices, self.gpu_states)
            return self.net(*args, **kwargs)


class _SeedCall(nn.Module):
    """One function of a seed block as a coupling function: the trunk's per-call context (``mask``,
    ``msa_mask``, ``msa_lead_dims``) passed under the keyword names the seed's block gives it.

    Args:
        fn: the block's :class:`Deterministic`.
        names: the seed's keyword -> the context's key, e.g. ``mask="msa_mask", lead_dims="msa_lead_dims"``.
    """

    def __init__(self, fn: Deterministic, **names: str):
        super().__init__()
        self.fn, self.names = fn, names

    def forward(self, *inputs: torch.Tensor, record_rng: bool = False, **context) -> torch.Tensor:
        return self.fn(*inputs, record_rng=record_rng, **{name: context.get(key) for name, key in self.names.items()})


# The seed blocks' halves: the pair stream x = (x1, x2), the MSA stream m = (m1, m2).
_X1, _X2, _M1, _M2 = range(4)


class _SeedBlock(nn.Module):
    """A seed block: its four functions f, g, j, k (each in a :class:`Deterministic`, as the seed) and the
    couplings that run them. The couplings live outside the module tree (a tuple), so the parameters are
    registered once, under the seed's names (``f.net...``), and a seed ``state_dict`` loads."""

    def __init__(self, f: nn.Module, g: nn.Module, j: nn.Module, k: nn.Module):
        super().__init__()
        self.f, self.g, self.j, self.k = Deterministic(f), Deterministic(g), Deterministic(j), Deterministic(k)
        self._couplings = tuple(self._build_couplings())

    def _build_couplings(self) -> list[Coupling]:
        raise NotImplementedError

    def couplings(self) -> tuple[Coupling, ...]:
        """x1 += f(...), x2 += g(x1), m1 += j(...), m2 += k(m1) over the halves (x1, x2, m1, m2)."""
        return self._couplings

    def train(self, mode: bool = True):
        super().train(mode)
        for c in self._couplings:  # the wrappers outside the module tree follow
            c.train(mode)
        return self

    def forward(self, x: torch.Tensor, m: Optional[torch.Tensor], mask=None, msa_mask=None, msa_lead_dims=None,
                _reverse: bool = True):
        """The seed's block step on width-2d streams: x (b, n, 2d), m (b, M, 2d) (or None: pair couplings only).
        ``_reverse=True`` runs without grad and records the generator states in training (the seed's forward
        inside its reversible function). Returns (x, m)."""
        halves = [*x.chunk(2, dim=2), *(m.chunk(2, dim=2) if m is not None else (None, None))]
        context = {"mask": mask, "msa_mask": msa_mask, "msa_lead_dims": msa_lead_dims}
        record_rng = self.training and _reverse
        with torch.no_grad() if _reverse else contextlib.nullcontext():
            for c in self._couplings:
                if c.active(halves):
                    out = c.fn(*(halves[i] for i in c.inputs), record_rng=record_rng, **context)
                    halves[c.target] = halves[c.target] + out
        m = None if m is None else torch.cat(halves[2:], dim=2)
        return torch.cat(halves[:2], dim=2), m


class ReversibleSelfAttnBlock(_SeedBlock):
    """x1 += f(x2, mask); x2 += g(x1); m1 += j(m2, msa_mask, msa_lead_dims); m2 += k(m1)."""

    def _build_couplings(self) -> list[Coupling]:
        return [
            Coupling(_SeedCall(self.f, mask="mask"), _X1, [_X2]),
            Coupling(_SeedCall(self.g), _X2, [_X1]),
            Coupling(_SeedCall(self.j, mask="msa_mask", lead_dims="msa_lead_dims"), _M1, [_M2]),
            Coupling(_SeedCall(self.k), _M2, [_M1]),
        ]


class ReversibleCrossAttnBlock(_SeedBlock):
    """x1 += f(x2, m2, mask, context_mask=msa_mask); x2 += g(x1); m1 += j(m2, x2, msa_mask, context_mask=mask);
    m2 += k(m1)."""

    def _build_couplings(self) -> list[Coupling]:
        return [
            Coupling(_SeedCall(self.f, mask="mask", context_mask="msa_mask"), _X1, [_X2, _M2]),
            Coupling(_SeedCall(self.g), _X2, [_X1]),
            Coupling(_SeedCall(self.j, mask="msa_mask", context_mask="mask"), _M1, [_M2, _X2]),
            Coupling(_SeedCall(self.k), _M2, [_M1]),
        ]


class ReversibleSequence(nn.Module):
    """The seed's reversible trunk on :class:`ReversibleCouplings` (``reverse=True``, activation memory
    independent of depth) or :class:`SequentialCouplings` (``reverse=False``), over the same parameters.

    Args:
        input_blocks: groups of 4 modules (f, g, j, k), self-attention and cross-attention blocks alternating
            (the seed 0.0.19's Alphafold2 passes these), or built :class:`ReversibleSelfAttnBlock` /
            :class:`ReversibleCrossAttnBlock` (later seed versions pass these).

    ``forward(seq, msa, mask=None, msa_mask=None, msa_lead_dims=None, reverse=True)``: seq (b, n, d), msa
    (b, M, d); each stream runs as two copies (the halves) and comes out as their mean, as the seed's
    concatenation and mean. Returns [seq, msa]. Without an MSA (msa=None; the seed asserted one) only the pair
    couplings run and msa comes back None.
    """

    def __init__(self, input_blocks):
        super().__init__()
        blocks = []
        for i, block in enumerate(input_blocks):
            if not isinstance(block, _SeedBlock):
                fns = list(block)
                if len(fns) != 4:
                    raise ValueError(f"input_blocks[{i}] must be a ReversibleSelfAttnBlock, a "
                                     f"ReversibleCrossAttnBlock or a group of 4 modules (f, g, j, k), got {len(fns)}")
                block = (ReversibleSelfAttnBlock if i % 2 == 0 else ReversibleCrossAttnBlock)(*fns)
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        couplings = [c for block in blocks for c in block.couplings()]
        # Outside the module tree (a tuple): the parameters are registered once, under blocks.
        self._trunks = (ReversibleCouplings(couplings, 4), SequentialCouplings(couplings, 4))

    def train(self, mode: bool = True):
        super().train(mode)
        for trunk in self._trunks:
            trunk.train(mode)
        return self

    def forward(self, seq: torch.Tensor, msa: Optional[torch.Tensor], mask=None, msa_mask=None, msa_lead_dims=None,
                reverse: bool = True) -> list:
        trunk = self._trunks[0] if reverse else self._trunks[1]
        x1, x2, m1, m2 = trunk(seq, seq, msa, msa, mask=mask, msa_mask=msa_mask, msa_lead_dims=msa_lead_dims)
        return [(x1 + x2) * 0.5, None if msa is None else (m1 + m2) * 0.5]
