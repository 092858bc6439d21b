"""``python -m af2_ext.bench <subcommand> [options]``: one subparser per benchmark module.

A benchmark module provides ``add_arguments(parser)`` and ``main(args) -> int``; register it in
:data:`SUBCOMMANDS`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "attention": ("af2_ext.bench.attention", "block-sparse attention vs dense SDPA, FlexAttention, reference"),
    "cross": ("af2_ext.bench.cross", "compressed cross-attention vs the materialising reference"),
    "reversible": ("af2_ext.bench.reversible", "reversible trunk vs ordinary autograd vs checkpointing, by depth"),
    "model": ("af2_ext.bench.model", "Alphafold2 training step vs impl='reference' and alphafold2-pytorch 0.0.19"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m af2_ext.bench", description="af2_ext benchmarks")
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
