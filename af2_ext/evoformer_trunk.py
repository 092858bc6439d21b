"""The Evoformer as the model's trunk: each update of an :class:`~af2_ext.evoformer.EvoformerBlock` as a
:class:`~af2_ext.reversible.Coupling`, so that one set of modules runs sequentially (AF2 supplementary Algorithm 6)
or through reversible recompute.

Sequential: two halves, the MSA stream m and the pair stream z, updated in Algorithm 6's order (each update reads
its own target: ordinary residuals). Reversible: four halves (m1, m2, z1, z2), both copies of each stream start
equal, and every update reads the other copy of its stream (and z2 for the row attention's pair bias), so that
each step can be undone::

    m1 += row_attention(m2, z2)   m2 += column_attention(m1)   m1 += msa_transition(m2)
    z1 += outer_product_mean(m1)  z2 += tri_mul_out(z1)         z1 += tri_mul_in(z2)
    z2 += tri_att_start(z1)       z1 += tri_att_end(z2)         z2 += pair_transition(z1)

Deliberate difference from Algorithm 6 (reversible only): an update reads the other copy of its stream, not the
stream it updates, as the seed's reversible trunk does for its own layers; the model reads out (z1 + z2) / 2.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from af2_ext.evoformer import EvoformerBlock
from af2_ext.reversible import Coupling

# The halves of the two arrangements.
M, Z = 0, 1
M1, M2, Z1, Z2 = range(4)


class _Update(nn.Module):
    """One update of a block as a coupling's function: ``dropout(module(*halves, <mask>))``, the mask taken from
    the trunk's context (``msa_mask`` for the MSA updates and the outer product mean, ``pair_mask`` for the pair
    updates). The dropout runs inside the function, so the reversible recompute replays its mask."""

    def __init__(self, module: nn.Module, mask: str, dropout: Optional[nn.Module] = None):
        super().__init__()
        self.module, self.mask, self.dropout = module, mask, dropout

    def forward(self, *halves, **context):
        out = self.module(*halves, context.get(self.mask))
        return out if self.dropout is None else self.dropout(out)


def block_couplings(block: EvoformerBlock, reversible: bool) -> nn.ModuleList:
    """The couplings of one block, in Algorithm 6's order, on two halves (m, z) or, reversible, four
    (m1, m2, z1, z2). They hold the block's modules (the couplings are what a model registers)."""
    b = block
    updates = [  # (module, mask, dropout), (target, inputs) sequential, (target, inputs) reversible
        ((b.msa_att_row, "msa_mask", b.msa_dropout_layer), (M, [M, Z]), (M1, [M2, Z2])),
        ((b.msa_att_col, "msa_mask", None), (M, [M]), (M2, [M1])),
        ((b.msa_transition, "msa_mask", None), (M, [M]), (M1, [M2])),
        ((b.outer_product_mean, "msa_mask", None), (Z, [M]), (Z1, [M1])),
        ((b.tri_mul_out, "pair_mask", b.ps_dropout_row_layer), (Z, [Z]), (Z2, [Z1])),
        ((b.tri_mul_in, "pair_mask", b.ps_dropout_row_layer), (Z, [Z]), (Z1, [Z2])),
        ((b.tri_att_start, "pair_mask", b.ps_dropout_row_layer), (Z, [Z]), (Z2, [Z1])),
        ((b.tri_att_end, "pair_mask", b.ps_dropout_col_layer), (Z, [Z]), (Z1, [Z2])),
        ((b.pair_transition, "pair_mask", None), (Z, [Z]), (Z2, [Z1])),
    ]
    return nn.ModuleList(Coupling(_Update(*fn), *(rev if reversible else seq)) for fn, seq, rev in updates)
