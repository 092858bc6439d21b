"""``python -m af2_ext.bench <subcommand> [options]``: one subparser per benchmark module.

A benchmark module provides ``add_arguments(parser)`` and ``main(args) -> int``; register it in
:data:`SUBCOMMANDS`. Every subcommand also takes ``--markdown PATH``: the report it prints, saved as markdown.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import shlex
import sys
from typing import Optional, Sequence

from af2_ext.fileio import atomic_open

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "attention": ("af2_ext.bench.attention", "block-sparse attention vs dense SDPA, FlexAttention, reference"),
    "compressed_attention": ("af2_ext.bench.compressed_attention",
                             "compressed (cross-)attention vs the materialising reference"),
    "reversible": ("af2_ext.bench.reversible", "reversible trunk vs ordinary autograd vs checkpointing, by depth"),
    "model": ("af2_ext.bench.model", "Alphafold2 training step vs impl='reference' and alphafold2-pytorch 0.0.19"),
    "model_scan": ("af2_ext.bench.model_scan",
                   "Alphafold2 step time, peak RSS and GFLOP/s against sequence length, a fresh process per run"),
    "bf16": ("af2_ext.bench.bf16", "bf16 on the CPU: block-sparse attention vs SDPA / FlexAttention / fp32, model autocast"),
    "triangle": ("af2_ext.bench.triangle", "triangle attention vs OpenFold math, SDPA, FlexAttention, CUDA libraries"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m af2_ext.bench", description="af2_ext benchmarks")
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.add_argument("--markdown", metavar="PATH", default=None,
                         help="also write the printed report (tables, targets) to PATH as markdown")
        sub.set_defaults(run=module.main)
    return parser


class _Tee(io.TextIOBase):
    """Writes to ``stream`` and keeps a copy."""

    def __init__(self, stream):
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.copy.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def write_markdown(path: str, command: str, argv: Sequence[str], report: str) -> None:
    """The report a subcommand printed, as a markdown page: a title, the command line, the text verbatim."""
    line = " ".join(["python -m af2_ext.bench"] + [shlex.quote(a) for a in argv])
    with atomic_open(path, "w") as out:
        out.write(f"# af2_ext benchmark: {command}\n\n`{line}`\n\n```text\n{report.rstrip()}\n```\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.markdown is None:
        return args.run(args)
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        status = args.run(args)
    write_markdown(args.markdown, args.command, argv, tee.copy.getvalue())
    print(f"wrote {args.markdown}")
    return status


if __name__ == "__main__":
    sys.exit(main())
