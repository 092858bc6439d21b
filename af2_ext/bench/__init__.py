"""Benchmarks, outside the tests: ``python -m af2_ext.bench <subcommand> --help``.

Subcommands: ``attention`` (block-sparse attention against dense SDPA, FlexAttention and the reference).
Results go to ``bench_results/<subcommand>-<device>.json`` (git-ignored) and a table on stdout.
"""
