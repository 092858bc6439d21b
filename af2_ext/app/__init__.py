"""The protein application built on the af2_ext kernel library: sidechainnet data and the dataset builder,
distogram training, checkpoints, folding, relax, plots, the demo and the ``af2-ext`` command line.

Installed by the ``app`` extra (``pip install 'af2_ext[app]'``). It imports the library; the library never
imports it. One module per concern: ``structure`` (the one PDB/mmCIF reader), ``sequences`` (tokens, FASTA,
MSA), ``data`` (datasets and batches), ``build_dataset``, ``train``, ``checkpoint``, ``fold``, ``relax``, ``plots``,
``demo``, ``cli``.
"""
