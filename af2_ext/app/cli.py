"""The ``af2-ext`` command line (also ``python -m af2_ext``): the protein application's one entry point.

    af2-ext demo                   train a small trunk on the bundled dataset, fold a held-out chain, report
    af2-ext train [--config F]     distogram pre-training (torchrun for several processes)
    af2-ext fold --checkpoint C    sequence(s) -> distogram -> coordinates -> PDB and plots
    af2-ext build-dataset FILES -o data.pkl
                                   a sidechainnet-format dataset from local PDB/mmCIF files

Each subcommand lives in its module of :mod:`af2_ext.app` as ``add_<name>_arguments(parser)`` and
``run_<name>(args) -> int``; the modules are imported only when their subcommand runs, so ``--help`` is quick and
this module needs nothing beyond the kernel library's dependencies: without the ``app`` extra a command says how
to install it and exits 2. The contract of every command: a user error is one line naming what is wrong and exit
code 2 (a ValueError, OSError or FloatingPointError raised by the command); files are written atomically, so none
is left half-written; nothing the user had is replaced unless asked (``train --resume`` / ``--overwrite``;
``--overwrite`` for ``demo``, ``fold``, ``build-dataset``).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Optional, Sequence

# subcommand -> (module, function suffix, one-line help)
SUBCOMMANDS = {
    "demo": ("af2_ext.app.demo", "demo", "train on the bundled dataset for a few minutes, fold a held-out chain"),
    "train": ("af2_ext.app.train", "train", "distogram pre-training on sidechainnet data"),
    "fold": ("af2_ext.app.fold", "fold", "predict a structure from a sequence with a trained checkpoint"),
    "build-dataset": ("af2_ext.app.build_dataset", "build_dataset",
                      "build a sidechainnet-format pickle from PDB/mmCIF files"),
}


# Packages of the "app" extra (pyproject.toml) that every command uses; a command run without them says how to
# install them instead of failing halfway with a traceback.
APP_PACKAGES = ("tqdm", "Bio", "matplotlib")


def _import_command(name: str, module_name: str):
    missing = [p for p in APP_PACKAGES if importlib.util.find_spec(p) is None]
    if not missing:
        try:
            return importlib.import_module(module_name)
        except ImportError as error:  # an application dependency beyond the common ones (sidechainnet, ...)
            if error.name is None or error.name.split(".")[0] in ("af2_ext", "torch", "numpy", "einops"):
                raise
            missing = [error.name]
    print(f"af2-ext {name}: error: the protein application is not installed (missing: {', '.join(missing)}); "
          "install it with: python -m pip install 'af2_ext[app]'", file=sys.stderr)
    raise SystemExit(2)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="af2-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, suffix, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == chosen:  # import only the module that runs
            module = _import_command(name, module_name)
            sub.description = module.__doc__
            getattr(module, f"add_{suffix}_arguments")(sub)
            sub.set_defaults(run=getattr(module, f"run_{suffix}"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, FloatingPointError) as error:
        # user errors (and the file system's: no permission, disk full, ...): one clear line, no traceback
        print(f"af2-ext {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"af2-ext {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
