"""af2_ext: block-sparse, compressed and reversible attention kernels for an AlphaFold2-style trunk.

The kernel library: ops (``af2_ext.ops``, with pure-PyTorch references in ``af2_ext.reference``), sparse layouts,
the trunk's modules and reversible recompute, and ``Alphafold2``, a drop-in for alphafold2-pytorch 0.0.19 (its
modules ``alphafold2``, ``reversible`` and ``utils`` are here under the same names). It needs only torch, numpy
and einops. The protein application (data, training, folding, plots, the ``af2-ext`` command) is
``af2_ext.app``, installed by the ``app`` extra; the library never imports it.
"""
from af2_ext import alphafold2, layouts, ops, reference, reversible
from af2_ext.model import Alphafold2
from af2_ext.ops import block_sparse_attention, compressed_attention, triangle_attention

__version__ = "0.1.0"

__all__ = ["Alphafold2", "alphafold2", "block_sparse_attention", "compressed_attention", "triangle_attention",
           "layouts", "ops", "reference", "reversible", "__version__"]
