"""Block-sparse attention layouts.

A layout is a ``torch.bool`` tensor of shape ``(num_heads, num_q_blocks, num_k_blocks)``; ``True`` means
the (query block, key block) pair is computed. Layouts are built on the CPU; move them with ``.to(device)``.

The structured builders (``local``, ``bigbird``, ``fixed``, ``variable``) are defined on the block diagonal.
For a non-square layout, query block ``i`` is placed at key block ``d(i) = i * num_k_blocks // num_q_blocks``
and every row rule (band, window membership, global row) is evaluated at ``d(i)``; column rules use key block
indices directly. For a square layout ``d(i) == i`` and the patterns are the published ones.

Random parts come from a local ``torch.Generator`` seeded with ``seed``: the global RNG is never touched, and
the same arguments always give the same layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from af2_ext._checks import check_int

__all__ = [
    "num_blocks",
    "dense",
    "local",
    "bigbird",
    "fixed",
    "variable",
    "seed_default",
    "from_mask",
    "to_mask",
    "density",
]


# ----------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _check_int_sequence(name: str, value, *, minimum: int, allow_empty: bool) -> list[int]:
    kind = "positive ints" if minimum == 1 else f"ints >= {minimum}"
    expected = f"a sequence of {kind}" if allow_empty else f"a non-empty sequence of {kind}"
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(_is_int(v) for v in value):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if any(v < minimum for v in value) or not (value or allow_empty):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return list(value)


def _check_grid(num_q_blocks, num_k_blocks, num_heads) -> tuple[int, int, int]:
    num_q_blocks = check_int("num_q_blocks", num_q_blocks, minimum=1)
    if num_k_blocks is None:
        num_k_blocks = num_q_blocks
    num_k_blocks = check_int("num_k_blocks", num_k_blocks, minimum=1)
    num_heads = check_int("num_heads", num_heads, minimum=1)
    return num_q_blocks, num_k_blocks, num_heads


def _check_layout(layout) -> None:
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or layout.dim() != 3:
        got = f"{layout.dtype} tensor of shape {tuple(layout.shape)}" if isinstance(layout, torch.Tensor) \
            else repr(type(layout))
        raise TypeError(f"layout must be a bool tensor of shape (H, num_q_blocks, num_k_blocks), got {got}")


def _generator(seed) -> torch.Generator:
    seed = check_int("seed", seed, minimum=0)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


def _diagonal_positions(num_q_blocks: int, num_k_blocks: int) -> torch.Tensor:
    """Key block on the diagonal for each query block: ``i * nk // nq``, shape [nq]."""
    return torch.arange(num_q_blocks) * num_k_blocks // num_q_blocks


def _per_head(layout: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[nq, nk] -> an independent [num_heads, nq, nk] copy."""
    return layout.unsqueeze(0).expand(num_heads, -1, -1).clone()


def _same_window(window_of_key: torch.Tensor, num_q_blocks: int) -> torch.Tensor:
    """[nq, nk] block-diagonal windows: query i sees key j when d(i) and j share a window id."""
    window_of_query = window_of_key[_diagonal_positions(num_q_blocks, window_of_key.numel())]
    return window_of_query[:, None] == window_of_key[None, :]


def _add_global(layout: torch.Tensor, global_keys: torch.Tensor, horizontal: bool) -> torch.Tensor:
    """Global key blocks are seen by every query; with ``horizontal`` their queries also see every key.

    Args:
        layout: [..., nq, nk] bool.
        global_keys: [nk] bool, the global key blocks.
        horizontal: whether the query rows on global blocks become dense.
    """
    num_q_blocks = layout.shape[-2]
    layout = layout | global_keys[None, :]
    if horizontal:
        global_queries = global_keys[_diagonal_positions(num_q_blocks, global_keys.numel())]
        layout = layout | global_queries[:, None]
    return layout


def _random_rows(num_q_blocks: int, num_k_blocks: int, num_random: int, generator: torch.Generator,
                 num_heads: int = 1) -> torch.Tensor:
    """[num_heads, nq, nk] with exactly ``num_random`` distinct random key blocks per row (uniform subsets)."""
    scores = torch.rand(num_heads, num_q_blocks, num_k_blocks, generator=generator)
    picked = scores.argsort(dim=-1)[..., :num_random]
    return torch.zeros(num_heads, num_q_blocks, num_k_blocks, dtype=torch.bool).scatter_(-1, picked, True)


# ----------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------


def num_blocks(seq_len: int, block_size: int) -> int:
    """Number of blocks covering ``seq_len`` tokens, the last one possibly partial (ceil division).

    Args:
        seq_len: positive sequence length.
        block_size: positive block size.
    """
    seq_len = check_int("seq_len", seq_len, minimum=1)
    block_size = check_int("block_size", block_size, minimum=1)
    return -(-seq_len // block_size)


def dense(num_q_blocks: int, num_k_blocks: int | None = None, *, num_heads: int = 1) -> torch.Tensor:
    """Every block pair computed.

    Args:
        num_q_blocks: number of query blocks.
        num_k_blocks: number of key blocks; defaults to ``num_q_blocks``.
        num_heads: number of heads.

    Returns:
        [num_heads, num_q_blocks, num_k_blocks] bool, all True.
    """
    nq, nk, h = _check_grid(num_q_blocks, num_k_blocks, num_heads)
    return torch.ones(h, nq, nk, dtype=torch.bool)


def local(num_q_blocks: int, num_k_blocks: int | None = None, *, window: int = 3,
          num_heads: int = 1) -> torch.Tensor:
    """Sliding-window band: query block ``i`` sees key block ``j`` when ``|j - d(i)| <= window // 2``.

    As in DeepSpeed's sliding window, an even ``window`` behaves like ``window + 1``; ``window=1`` is the
    block diagonal. ``d(i) = i`` for square layouts (see the module docstring otherwise).

    Args:
        num_q_blocks: number of query blocks.
        num_k_blocks: number of key blocks; defaults to ``num_q_blocks``.
        window: band width in blocks, >= 1.
        num_heads: number of heads (all identical).

    Returns:
        [num_heads, num_q_blocks, num_k_blocks] bool.
    """
    nq, nk, h = _check_grid(num_q_blocks, num_k_blocks, num_heads)
    window = check_int("window", window, minimum=1)
    offset = torch.arange(nk)[None, :] - _diagonal_positions(nq, nk)[:, None]  # [nq, nk]
    return _per_head(offset.abs() <= window // 2, h)


def bigbird(num_q_blocks: int, num_k_blocks: int | None = None, *, window: int = 3, num_global: int = 1,
            num_random: int = 1, num_heads: int = 1, seed: int = 0) -> torch.Tensor:
    """BigBird (Zaheer et al. 2020): sliding window + global blocks + random blocks.

    - window: the ``local`` band ``|j - d(i)| <= window // 2``;
    - global: key blocks ``0 .. num_global - 1`` are seen by every query, and the query blocks on them
      (``d(i) < num_global``) see every key;
    - random: each query row then gets ``num_random`` more key blocks drawn uniformly among those not yet
      set, fewer when not enough are left. Each head draws its own.

    Args:
        num_q_blocks: number of query blocks.
        num_k_blocks: number of key blocks; defaults to ``num_q_blocks``.
        window: band width in blocks, >= 1.
        num_global: number of leading global blocks, 0 .. num_k_blocks.
        num_random: random key blocks added per query row, >= 0.
        num_heads: number of heads.
        seed: seed of the local generator for the random blocks.

    Returns:
        [num_heads, num_q_blocks, num_k_blocks] bool.
    """
    nq, nk, h = _check_grid(num_q_blocks, num_k_blocks, num_heads)
    window = check_int("window", window, minimum=1)
    num_global = check_int("num_global", num_global, minimum=0)
    if num_global > nk:
        raise ValueError(f"num_global must be <= num_k_blocks ({nk}), got {num_global}")
    num_random = check_int("num_random", num_random, minimum=0)
    generator = _generator(seed)

    global_keys = torch.arange(nk) < num_global
    layout = _per_head(_add_global(local(nq, nk, window=window)[0], global_keys, horizontal=True), h)

    # Set blocks rank last, so a row short of free blocks re-picks set ones: a no-op under OR.
    scores = torch.rand(h, nq, nk, generator=generator).masked_fill_(layout, math.inf)
    picked = scores.topk(min(num_random, nk), dim=-1, largest=False).indices
    return layout.scatter_(-1, picked, True)


def fixed(num_q_blocks: int, num_k_blocks: int | None = None, *, num_local_blocks: int = 4,
          num_global_blocks: int = 1, num_different_global_patterns: int = 1,
          horizontal_global_attention: bool = False, num_heads: int = 1) -> torch.Tensor:
    """Sparse Transformer "fixed" pattern, as DeepSpeed's ``FixedSparsityConfig(attention='bidirectional')``.

    - local: consecutive windows of ``num_local_blocks`` blocks (the last one may be short); blocks in the
      same window see each other.
    - global: the last ``num_global_blocks`` blocks of each full window are seen by every query. Head ``h``
      uses pattern ``p = h % num_different_global_patterns``, which shifts the global blocks ``p``
      positions of ``num_global_blocks`` towards the window start. In a short last window the global blocks
      sit at the same offset, pulled back to end at the last block.
    - horizontal_global_attention: query blocks on global blocks also see every key block.

    Where DeepSpeed asks for ``different_layout_per_head=True`` to allow several global patterns, here
    ``num_different_global_patterns > 1`` is enough.

    Args:
        num_q_blocks: number of query blocks.
        num_k_blocks: number of key blocks; defaults to ``num_q_blocks``.
        num_local_blocks: window size in blocks, >= 1.
        num_global_blocks: global blocks per window; must divide ``num_local_blocks``.
        num_different_global_patterns: 1 .. num_local_blocks // num_global_blocks.
        horizontal_global_attention: whether global query rows are dense too.
        num_heads: number of heads.

    Returns:
        [num_heads, num_q_blocks, num_k_blocks] bool.
    """
    nq, nk, h = _check_grid(num_q_blocks, num_k_blocks, num_heads)
    num_local_blocks = check_int("num_local_blocks", num_local_blocks, minimum=1)
    num_global_blocks = check_int("num_global_blocks", num_global_blocks, minimum=1)
    if num_local_blocks % num_global_blocks != 0:
        raise ValueError(f"num_global_blocks must divide num_local_blocks ({num_local_blocks}), "
                         f"got {num_global_blocks}")
    num_different_global_patterns = check_int("num_different_global_patterns", num_different_global_patterns,
                                              minimum=1)
    max_patterns = num_local_blocks // num_global_blocks
    if num_different_global_patterns > max_patterns:
        raise ValueError(f"num_different_global_patterns must be <= num_local_blocks // num_global_blocks "
                         f"({max_patterns}), got {num_different_global_patterns}")
    _check_bool("horizontal_global_attention", horizontal_global_attention)

    key = torch.arange(nk)
    local_part = _same_window(key // num_local_blocks, nq)  # [nq, nk]
    full_windows_end = nk - nk % num_local_blocks

    patterns = []
    for pattern in range(num_different_global_patterns):
        first = num_local_blocks - (1 + pattern) * num_global_blocks  # offset of the global run in a window
        offset = key % num_local_blocks
        global_keys = (key < full_windows_end) & (offset >= first) & (offset < first + num_global_blocks)
        if full_windows_end < nk:
            start = max(0, min(full_windows_end + first, nk - num_global_blocks))
            global_keys |= (key >= start) & (key < start + num_global_blocks)
        patterns.append(_add_global(local_part, global_keys, horizontal_global_attention))
    return torch.stack(patterns)[torch.arange(h) % num_different_global_patterns]  # [h, nq, nk]


def variable(num_q_blocks: int, num_k_blocks: int | None = None, *, local_window_blocks: Sequence[int] = (4,),
             global_block_indices: Sequence[int] = (0,), global_block_end_indices: Sequence[int] | None = None,
             num_random_blocks: int = 0, horizontal_global_attention: bool = False, num_heads: int = 1,
             seed: int = 0) -> torch.Tensor:
    """DeepSpeed's ``VariableSparsityConfig(attention='bidirectional')``: random + local + global blocks.

    - random: each query row sees ``num_random_blocks`` distinct key blocks drawn uniformly from all of them
      (they may fall on local or global blocks, as in DeepSpeed).
    - local: consecutive windows whose sizes are ``local_window_blocks``, the last size repeating to the
      end; blocks in the same window see each other.
    - global: key blocks ``global_block_indices`` (or the ranges ``[start, end)`` when
      ``global_block_end_indices`` is given) are seen by every query; indices past the end are ignored.
    - horizontal_global_attention: query blocks on global blocks also see every key block.

    All heads share one layout, as DeepSpeed does with its default ``different_layout_per_head=False``
    (the seed's setting).

    Args:
        num_q_blocks: number of query blocks.
        num_k_blocks: number of key blocks; defaults to ``num_q_blocks``.
        local_window_blocks: non-empty window sizes in blocks, each >= 1.
        global_block_indices: global block indices (starts of ranges with ``global_block_end_indices``).
        global_block_end_indices: exclusive range ends, same length as ``global_block_indices``, or None.
        num_random_blocks: random key blocks per query row, 0 .. num_k_blocks.
        horizontal_global_attention: whether global query rows are dense too.
        num_heads: number of heads.
        seed: seed of the local generator for the random blocks.

    Returns:
        [num_heads, num_q_blocks, num_k_blocks] bool.
    """
    nq, nk, h = _check_grid(num_q_blocks, num_k_blocks, num_heads)
    windows = _check_int_sequence("local_window_blocks", local_window_blocks, minimum=1, allow_empty=False)
    starts = _check_int_sequence("global_block_indices", global_block_indices, minimum=0, allow_empty=True)
    if global_block_end_indices is None:
        ends = [start + 1 for start in starts]
    else:
        ends = _check_int_sequence("global_block_end_indices", global_block_end_indices, minimum=0,
                                   allow_empty=True)
        if len(ends) != len(starts):
            raise ValueError(f"global_block_end_indices must have the length of global_block_indices "
                             f"({len(starts)}), got {len(ends)}")
        for start, end in zip(starts, ends):
            if start >= end:
                raise ValueError(f"global_block_end_indices must be > global_block_indices element-wise, "
                                 f"got start {start} and end {end}")
    num_random_blocks = check_int("num_random_blocks", num_random_blocks, minimum=0)
    if num_random_blocks > nk:
        raise ValueError(f"num_random_blocks must be <= num_k_blocks ({nk}), got {num_random_blocks}")
    _check_bool("horizontal_global_attention", horizontal_global_attention)
    generator = _generator(seed)

    while sum(windows) < nk:
        windows.append(windows[-1])
    window_ends = torch.tensor(windows).cumsum(0)
    key = torch.arange(nk)
    local_part = _same_window(torch.bucketize(key, window_ends, right=True), nq)  # [nq, nk]

    global_keys = torch.zeros(nk, dtype=torch.bool)
    for start, end in zip(starts, ends):
        global_keys |= (key >= start) & (key < end)

    random_part = _random_rows(nq, nk, num_random_blocks, generator)[0]
    layout = _add_global(random_part | local_part, global_keys, horizontal_global_attention)
    return _per_head(layout, h)


def seed_default(seq_len: int, *, block_size: int = 16, num_heads: int = 1, seed: int = 0) -> torch.Tensor:
    """The layout of the seed (alphafold2-pytorch 0.0.19) sparse attention.

    ``VariableSparsityConfig(num_heads, block=block_size, num_random_blocks=seq_len // block_size // 4,
    attention='bidirectional')`` with its other defaults: windows of 4 blocks, block 0 global, random
    blocks shared by all heads. The random draw uses our generator, not Python's ``random``.

    Args:
        seq_len: sequence length in tokens; a partial last block counts as a block.
        block_size: block size in tokens.
        num_heads: number of heads.
        seed: seed of the local generator for the random blocks.

    Returns:
        [num_heads, ceil(seq_len / block_size), ceil(seq_len / block_size)] bool.
    """
    n = num_blocks(seq_len, block_size)
    return variable(n, num_random_blocks=seq_len // block_size // 4, num_heads=num_heads, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# Element masks
# ----------------------------------------------------------------------------------------------------------


def from_mask(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Coarsen an element mask to a layout: a block is True if any element in it is True.

    Args:
        mask: [Nq, Nk] or [H, Nq, Nk] bool; Nq and Nk need not be multiples of ``block_size``.
        block_size: block size in elements.

    Returns:
        [1 or H, ceil(Nq / block_size), ceil(Nk / block_size)] bool, on ``mask``'s device.
    """
    if (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() not in (2, 3)
            or 0 in mask.shape):
        got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) \
            else repr(type(mask))
        raise TypeError(f"mask must be a bool tensor of shape (Nq, Nk) or (H, Nq, Nk), got {got}")
    block_size = check_int("block_size", block_size, minimum=1)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    h, n_q, n_k = mask.shape
    nq, nk = num_blocks(n_q, block_size), num_blocks(n_k, block_size)
    padded = mask.new_zeros(h, nq * block_size, nk * block_size)
    padded[:, :n_q, :n_k] = mask
    return padded.view(h, nq, block_size, nk, block_size).any(dim=4).any(dim=2)  # [h, nq, nk]


def to_mask(layout: torch.Tensor, block_size: int, seq_len_q: int, seq_len_k: int) -> torch.Tensor:
    """Expand a layout to an element mask, cropping the partial tail blocks.

    Args:
        layout: [H, num_q_blocks, num_k_blocks] bool.
        block_size: block size in elements.
        seq_len_q: query length; ``ceil(seq_len_q / block_size)`` must equal ``num_q_blocks``.
        seq_len_k: key length; ``ceil(seq_len_k / block_size)`` must equal ``num_k_blocks``.

    Returns:
        [H, seq_len_q, seq_len_k] bool, on ``layout``'s device.
    """
    _check_layout(layout)
    block_size = check_int("block_size", block_size, minimum=1)
    for name, seq_len, blocks in (("seq_len_q", seq_len_q, layout.shape[1]),
                                  ("seq_len_k", seq_len_k, layout.shape[2])):
        if num_blocks(check_int(name, seq_len, minimum=1), block_size) != blocks:
            raise ValueError(f"{name} must span {blocks} blocks of {block_size} "
                             f"({(blocks - 1) * block_size + 1}..{blocks * block_size}), got {seq_len}")
    rows = torch.arange(seq_len_q, device=layout.device) // block_size
    cols = torch.arange(seq_len_k, device=layout.device) // block_size
    return layout[:, rows[:, None], cols[None, :]]  # [h, seq_len_q, seq_len_k]


def density(layout: torch.Tensor) -> float:
    """Fraction of block pairs computed.

    Args:
        layout: [H, num_q_blocks, num_k_blocks] bool, non-empty.
    """
    _check_layout(layout)
    if layout.numel() == 0:
        raise ValueError(f"layout must be non-empty, got shape {tuple(layout.shape)}")
    return layout.count_nonzero().item() / layout.numel()
