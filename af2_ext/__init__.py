"""af2_ext: block-sparse, compressed and reversible attention kernels for an AlphaFold2-style trunk."""
from af2_ext import layouts, ops, reference
from af2_ext.model import Alphafold2
from af2_ext.ops import block_sparse_attention, compressed_attention

__version__ = "0.1.0"

__all__ = ["Alphafold2", "block_sparse_attention", "compressed_attention", "layouts", "ops", "reference", "__version__"]
