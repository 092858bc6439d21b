"""Tests for af2_ext.app.fold and the modules it runs on (sequences, plots, relax): parsing, the distogram -> Cα
trace path on a real structure, the whole ``af2-ext fold`` run on a tiny checkpoint, reference metrics and the
optional relax.

Real structure: ``data/1ubi_A_backbone.npz``, chain A of PDB 1UBI (ubiquitin, 76 residues; see test_utils.py).
"""
import argparse
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tqdm", reason="af2_ext.app.fold needs tqdm (pip install tqdm)")

from af2_ext import utils  # noqa: E402
from af2_ext.app import fold, plots, relax, sequences  # noqa: E402
from af2_ext.app.checkpoint import load_model, save_checkpoint  # noqa: E402
from af2_ext.model import Alphafold2  # noqa: E402

import helpers  # noqa: E402

DATA = np.load(os.path.join(os.path.dirname(__file__), "data", "1ubi_A_backbone.npz"))
SEQUENCE = str(DATA["sequence"])
BACKBONE = torch.tensor(DATA["coords"], dtype=torch.float64)  # [76, 4 (N, CA, C, O), 3]
CA = BACKBONE[:, 1]
TINY = dict(dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)


def _needs_biopython():
    pytest.importorskip("Bio", reason="reading and writing PDB files needs biopython (pip install biopython)")


def _needs_matplotlib():
    pytest.importorskip("matplotlib", reason="the fold plots need matplotlib (pip install matplotlib)")


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _write_reference(path, chains: dict) -> str:
    """A PDB with one chain per ``{chain_id: (start, stop)}`` slice of ubiquitin (N, CA, C, O)."""
    lines = []
    for chain_id, (start, stop) in chains.items():
        part = path.parent / f".chain_{chain_id}.pdb"
        utils.write_pdb(part, BACKBONE[start:stop], SEQUENCE[start:stop], chain_id=chain_id)
        lines += [line for line in part.read_text().splitlines() if line.startswith(("ATOM", "TER"))]
        part.unlink()
    return _write(path, "\n".join(lines + ["END", ""]))


def _read_chain(path):
    from Bio.PDB import PDBParser

    return list(next(iter(PDBParser(QUIET=True).get_structure("x", str(path))[0])))


def _assert_png(path) -> None:
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    image = pytest.importorskip("matplotlib.image").imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model=Alphafold2(**TINY), model_config=TINY, step=7)
    return str(path)


class _FixedDistogram(torch.nn.Module):
    """Stands in for a trained model: returns the given (n, n, 37) logits whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)
        self.max_seq_len = logits.shape[0]

    def forward(self, seq, msa=None, **_):
        assert seq.shape == (1, self.max_seq_len)
        return self.logits[None]


# ----------------------------------------------------------------------------------------------------------
# Sequences and alignments
# ----------------------------------------------------------------------------------------------------------


def test_tokenize_and_read_fasta(tmp_path):
    assert sequences.tokenize("ACDY").tolist() == [0, 1, 2, 19]
    assert sequences.tokenize("mqXb").tolist() == [10, 13, sequences.UNKNOWN_TOKEN, sequences.UNKNOWN_TOKEN]
    path = _write(tmp_path / "seqs.fasta", "; comment\n>first protein one\nMQIF\nvktl*\n\n>second\nGGX\n")
    assert sequences.read_fasta(path) == [("first", "MQIFVKTL"), ("second", "GGX")]


def test_fasta_errors_name_the_file_and_record(tmp_path):
    empty = _write(tmp_path / "empty.fasta", "\n  \n")
    with pytest.raises(ValueError, match=r"empty\.fasta' is empty"):
        sequences.read_fasta(empty)
    bad = _write(tmp_path / "bad.fasta", ">ok\nMQIF\n>broken\nMQ1F\n")
    with pytest.raises(ValueError, match=r"bad\.fasta', record 'broken' \(line 3\): invalid character '1' at "
                                         r"position 3"):
        sequences.read_fasta(bad)
    headless = _write(tmp_path / "headless.fasta", "MQIF\n")
    with pytest.raises(ValueError, match=r"headless\.fasta', line 1: sequence data before the first '>'"):
        sequences.read_fasta(headless)
    blank = _write(tmp_path / "blank.fasta", ">a\n>b\nMQ\n")
    with pytest.raises(ValueError, match=r"blank\.fasta', record 'a' \(line 1\): empty sequence"):
        sequences.read_fasta(blank)
    with pytest.raises(FileNotFoundError, match="missing.fasta"):
        sequences.read_fasta(tmp_path / "missing.fasta")
    with pytest.raises(ValueError, match="invalid character '-'"):
        sequences.tokenize("MQ-F")


def test_read_msa_a3m_and_aligned_fasta(tmp_path):
    gap = sequences.GAP_TOKEN
    a3m = _write(tmp_path / "aln.a3m", ">query\nMQIF\n>hit1\nMqqQ-F\n>hit2\n-Q.IaF\n")
    assert sequences.read_msa(a3m).tolist() == [[10, 13, 7, 4], [10, 13, gap, 4], [gap, 13, 7, 4]]
    # Not named .a3m: recognised because the rows only line up without the lower case.
    renamed = _write(tmp_path / "aln.txt", (tmp_path / "aln.a3m").read_text())
    assert torch.equal(sequences.read_msa(renamed), sequences.read_msa(a3m))
    aligned = _write(tmp_path / "aln.fasta", ">query\nMQIF\n>hit\nmq.f\n")
    assert sequences.read_msa(aligned).tolist() == [[10, 13, 7, 4], [10, 13, gap, 4]]
    ragged = _write(tmp_path / "ragged.fasta", ">query\nMQIF\n>short\nMQI\n")
    with pytest.raises(ValueError, match=r"ragged\.fasta', record 'short' \(line 3\): 3 aligned columns, but the "
                                         r"first row has 4"):
        sequences.read_msa(ragged)
    invalid = _write(tmp_path / "invalid.a3m", ">query\nMQ#F\n")
    with pytest.raises(ValueError, match=r"invalid\.a3m', record 'query'.*'#'"):
        sequences.read_msa(invalid)


def test_gzip_bom_and_binary_inputs(tmp_path):
    import gzip

    with gzip.open(tmp_path / "seqs.fasta.gz", "wt") as handle:
        handle.write(">a\nMQIF\n")
    assert sequences.read_fasta(tmp_path / "seqs.fasta.gz") == [("a", "MQIF")]
    with gzip.open(tmp_path / "aln.a3m.gz", "wt") as handle:
        handle.write(">query\nMQIF\n>hit\nMqqQ-F\n")
    gap = sequences.GAP_TOKEN
    assert sequences.read_msa(tmp_path / "aln.a3m.gz").tolist() == [[10, 13, 7, 4], [10, 13, gap, 4]]
    (tmp_path / "bom.fasta").write_bytes(b"\xef\xbb\xbf>a\nMQIF\n")  # as Windows editors save UTF-8
    assert sequences.read_fasta(tmp_path / "bom.fasta") == [("a", "MQIF")]
    (tmp_path / "blob.fasta").write_bytes(b">a\n\xff\xfe\x00\n")
    with pytest.raises(ValueError, match=r"FASTA file '.*blob\.fasta' is not a text file"):
        sequences.read_fasta(tmp_path / "blob.fasta")
    (tmp_path / "fake.fasta.gz").write_text(">a\nMQIF\n")
    with pytest.raises(ValueError, match=r"FASTA file '.*fake\.fasta\.gz' is not a text file"):
        sequences.read_fasta(tmp_path / "fake.fasta.gz")
    _needs_biopython()
    reference = _write_reference(tmp_path / "ubq.pdb", {"A": (0, 10)})
    with open(reference, "rb") as src, gzip.open(tmp_path / "ubq.pdb.gz", "wb") as dst:
        dst.write(src.read())
    [chain] = fold.read_reference(tmp_path / "ubq.pdb.gz")
    assert chain.sequence == SEQUENCE[:10] and torch.equal(chain.ca, fold.read_reference(reference)[0].ca)


# ----------------------------------------------------------------------------------------------------------
# Distogram -> Cα trace
# ----------------------------------------------------------------------------------------------------------


def test_true_distogram_recovers_ubiquitin(tmp_path):
    """The real Cα distances, binned and given as sharp logits, fold back to ubiquitin with the right hand."""
    _needs_biopython()
    labels = utils.get_bucketed_distance_matrix(CA[None].float())[0]
    logits = torch.nn.functional.one_hot(labels, utils.DISTOGRAM_BUCKETS).float() * 30.0  # [76, 76, 37]
    result = fold.fold_sequence(_FixedDistogram(logits), SEQUENCE.lower(), name="ubq")
    assert result.sequence == SEQUENCE and result.coords.shape == (76, 3) and result.logits.shape == (76, 76, 37)
    aligned, truth = utils.Kabsch(result.coords.double().T, CA.T)
    rmsd, tm = float(utils.RMSD(aligned, truth)[0]), float(utils.TMscore(aligned, truth)[0])
    assert rmsd < 1.5 and tm > 0.8, f"RMSD {rmsd:.2f} Å, TM {tm:.3f} (no mirror allowed)"
    assert result.chirality > 0.3

    reference = _write_reference(tmp_path / "ubq.pdb", {"A": (0, 76)})
    metrics = fold.compare_to_reference(result, reference)
    assert metrics["chain"] == "A" and metrics["residues"] == metrics["aligned_residues"] == 76
    assert metrics["rmsd"] == pytest.approx(rmsd, abs=1e-3)
    assert metrics["tm_score"] > 0.8 and metrics["gdt_ts"] > 0.8 and metrics["lddt_ca"] > 0.9
    assert metrics["distogram_accuracy"] > 0.99  # the reference keeps 3 decimals: a pair may cross a bin edge

    # The same reference as mmCIF.
    from Bio.PDB import MMCIFIO, PDBParser

    cif = MMCIFIO()
    cif.set_structure(PDBParser(QUIET=True).get_structure("ubq", reference))
    cif.save(str(tmp_path / "ubq.cif"))
    from_cif = fold.compare_to_reference(result, tmp_path / "ubq.cif", chain="A")
    assert from_cif == pytest.approx({**metrics, "reference": str(tmp_path / "ubq.cif")})


def test_choose_handedness_undoes_a_mirror():
    mirror = CA * CA.new_tensor([1.0, 1.0, -1.0])
    coords, score, mirrored = fold.choose_handedness(mirror)
    assert mirrored and score > 0.3
    torch.testing.assert_close(coords, CA)
    coords, same_score, mirrored = fold.choose_handedness(CA)
    assert not mirrored and same_score == pytest.approx(score) and torch.equal(coords, CA)
    assert fold.choose_handedness(CA[:3])[1:] == (0.0, False)


def test_rebuild_backbone_near_the_real_one():
    rebuilt = relax.rebuild_backbone(CA)  # [76, 4, 3]
    torch.testing.assert_close(rebuilt[:, 1], CA)
    rmsd = (rebuilt - BACKBONE).square().sum(-1).mean(0).sqrt()  # [4]
    assert rmsd[0] < 0.4 and rmsd[2] < 0.5 and rmsd[3] < 1.5, f"N, CA, C, O RMSD {rmsd.tolist()}"
    torch.testing.assert_close((rebuilt[:, 0] - rebuilt[:, 1]).norm(dim=-1), torch.full((76,), 1.458,
                                                                                       dtype=torch.float64))
    phi = utils.get_dihedral_torch(rebuilt[:-1, 2], rebuilt[1:, 0], rebuilt[1:, 1], rebuilt[1:, 2])
    assert float((phi < 0).double().mean()) > 0.9, "L-amino-acid backbone: phi mostly negative"


# ----------------------------------------------------------------------------------------------------------
# af2-ext fold
# ----------------------------------------------------------------------------------------------------------


def _fold_args(*argv):
    parser = argparse.ArgumentParser()
    fold.add_fold_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_fold_two_records_with_reference(tmp_path, checkpoint, capsys):
    _needs_biopython()
    _needs_matplotlib()
    fasta = _write(tmp_path / "ubq.fasta", f">ubq_n N half\n{SEQUENCE[:40]}\n>ubq_c\n{SEQUENCE[36:].lower()}\n")
    reference = _write_reference(tmp_path / "ubq_two_chains.pdb", {"A": (0, 40), "B": (36, 76)})
    out = tmp_path / "out"
    args = _fold_args("--checkpoint", checkpoint, "--fasta", fasta, "--reference", reference, "-o", str(out),
                      "--device", "cpu", "--mds-iters", "50")
    assert fold.run_fold(args) == 0
    printed = capsys.readouterr().out
    assert "TM-score" in printed and "lDDT-Cα" in printed and "ubq_n" in printed and "ubq_c" in printed

    expected = [f"{stem}{suffix}" for stem in ("ubq_c", "ubq_n")
                for suffix in (".pdb", "_contacts.png", "_distogram.png", "_metrics.json")]
    assert sorted(os.listdir(out)) == expected, "exactly the outputs, no temporary file left"
    for stem, sequence, chain in (("ubq_n", SEQUENCE[:40], "A"), ("ubq_c", SEQUENCE[36:], "B")):
        residues = _read_chain(out / f"{stem}.pdb")
        assert [r.get_resname() for r in residues] == [utils.ONE_TO_THREE_LETTER_MAP[a] for a in sequence]
        assert all([a.get_id() for a in r] == ["CA"] for r in residues)
        _assert_png(out / f"{stem}_distogram.png")
        _assert_png(out / f"{stem}_contacts.png")
        metrics = json.loads((out / f"{stem}_metrics.json").read_text())
        assert metrics["name"] == stem and metrics["length"] == 40 and metrics["checkpoint_step"] == 7
        ref = metrics["reference"]
        assert ref["chain"] == chain and ref["aligned_residues"] == 40
        assert 0 <= ref["rmsd"] < 100
        for key in ("gdt_ts", "tm_score", "lddt_ca", "distogram_accuracy"):
            assert 0 <= ref[key] <= 1, (key, ref[key])
        assert metrics["files"]["pdb"] == str(out / f"{stem}.pdb")


def test_fold_from_checkpoint_single_sequence_with_msa(tmp_path, checkpoint):
    _needs_biopython()
    _needs_matplotlib()
    msa = _write(tmp_path / "aln.a3m", ">query\nMQIFXKTL\n>hit\nMQaVF-KTL\n")
    [output] = fold.fold_from_checkpoint(checkpoint, "mqifxktl", tmp_path / "out", msa=msa, device="cpu",
                                         mds_iters=20)
    assert output.result.name == "query" and output.result.coords.shape == (8, 3)
    assert torch.isfinite(output.result.coords).all()
    torch.testing.assert_close(output.result.probs.sum(-1), torch.ones(8, 8))
    assert output.metrics["reference"] is None and output.metrics["msa_rows"] == 2
    assert [r.get_resname() for r in _read_chain(output.files["pdb"])][4] == "UNK"
    assert json.loads(open(output.files["metrics"]).read())["sequence"] == "MQIFXKTL"
    # Same seed, same checkpoint: the same structure.
    [again] = fold.fold_from_checkpoint(checkpoint, {"query": "MQIFXKTL"}, tmp_path / "again", msa=msa,
                                        device="cpu", mds_iters=20)
    torch.testing.assert_close(again.result.coords, output.result.coords)


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_fold_logits_match_the_reference_model(device, checkpoint):
    """fold_sequence on ``device`` gives the logits of the same checkpoint run as pure PyTorch on the CPU, with
    the query as the single MSA row (the trainer's default input)."""
    helpers.require_device(device)
    model, _ = load_model(checkpoint, map_location=device)
    sequence = SEQUENCE[:24]
    result = fold.fold_sequence(model, sequence, mds_iters=20)  # on the model's device
    reference, _ = load_model(checkpoint)
    tokens = sequences.tokenize(sequence)[None]
    with torch.no_grad():
        expected = reference.set_impl("reference")(tokens, msa=tokens[:, None])[0]
    assert result.logits.device.type == "cpu" and result.logits.dtype == torch.float32
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(result.coords).all() and result.coords.shape == (24, 3)


def test_fold_errors(tmp_path, checkpoint, monkeypatch):
    _needs_biopython()
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"sequence 'query' has 65 residues.*max_seq_len=64"):
        fold.run_fold(_fold_args("--checkpoint", checkpoint, "--sequence", "A" * 65, "-o", out, "--device", "cpu"))
    reference = _write_reference(tmp_path / "ubq_ref.pdb", {"A": (0, 40)})
    with pytest.raises(ValueError, match=r"ubq_ref\.pdb'.*no chain matches the sequence of 'query' \(39 residues"):
        fold.run_fold(_fold_args("--checkpoint", checkpoint, "--sequence", SEQUENCE[:39], "--reference", reference,
                                 "-o", out, "--device", "cpu"))
    with pytest.raises(ValueError, match=r"ubq_ref\.pdb' has no protein chain 'B'"):
        fold.run_fold(_fold_args("--checkpoint", checkpoint, "--sequence", SEQUENCE[:40], "--reference", reference,
                                 "--chain", "B", "-o", out, "--device", "cpu"))
    with pytest.raises(ValueError, match=r"sequence 'query': invalid character '1' at position 3"):
        fold.run_fold(_fold_args("--checkpoint", checkpoint, "--sequence", "MQ1", "-o", out, "--device", "cpu"))
    with pytest.raises(ValueError, match="an MSA goes with one sequence"):
        fold.fold_from_checkpoint(checkpoint, ["MQIF", "MQIV"], out, msa=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="MSA has 5 columns but sequence 'query' has 4"):
        fold.fold_from_checkpoint(checkpoint, "MQIF", out, msa=torch.zeros(1, 5, dtype=torch.long), device="cpu")
    if relax.relax_available():
        with pytest.raises(ValueError, match=r"relax needs the 20 standard residues; \['query'\]"):
            fold.fold_from_checkpoint(checkpoint, "MQXF", out, relax=True)
    short_reference = _write_reference(tmp_path / "ubq_short.pdb", {"A": (0, 2)})
    with pytest.raises(ValueError, match=r"ubq_short\.pdb', chain 'A': fewer than 3 residues with a Cα"):
        fold.fold_from_checkpoint(checkpoint, SEQUENCE[:2], out, reference=short_reference, device="cpu")
    if relax.relax_available():
        with pytest.raises(ValueError, match=r"relax needs at least 2 residues; \['query'\]"):
            fold.fold_from_checkpoint(checkpoint, "M", out, relax=True, device="cpu")
    with pytest.raises(ValueError, match=r"distinct file names, got duplicates \['a_relaxed'\]"):
        fold.fold_from_checkpoint(checkpoint, [("a", "MQIF"), ("a_relaxed", "MQIV")], out, relax=True)
    in_the_way = _write(tmp_path / "a_file", "")
    with pytest.raises(ValueError, match=r"output directory '.*a_file' cannot be created"):
        fold.run_fold(_fold_args("--checkpoint", checkpoint, "--sequence", "MQIF", "-o", in_the_way,
                                 "--device", "cpu"))
    monkeypatch.setitem(sys.modules, "pdbfixer", None)  # as if the relax extra were not installed
    with pytest.raises(ValueError, match=r"pip install 'af2_ext\[relax\]'"):
        fold.run_fold(_fold_args("--checkpoint", checkpoint, "--sequence", "MQIF", "--relax", "-o", out))
    assert not os.path.exists(out), "errors are raised before anything is written"


def test_cli_device_and_path_errors_are_one_line(tmp_path, checkpoint, capsys):
    from af2_ext.app import cli

    fasta = _write(tmp_path / "q.fasta", ">q\nMQIF\n")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(checkpoint, "rb").read()[:1000])
    cases = [
        (["--checkpoint", checkpoint, "--fasta", fasta, "--device", "tpu9"], r"device 'tpu9' is not"),
        (["--checkpoint", checkpoint, "--fasta", fasta, "--device", "cuda:x"], r"device 'cuda:x' is not"),
        (["--checkpoint", os.fspath(tmp_path), "--fasta", fasta, "--device", "cpu"],
         r"checkpoint '.*' is a directory"),
        (["--checkpoint", checkpoint, "--fasta", os.fspath(tmp_path), "--device", "cpu"],
         r"FASTA file '.*' is a directory"),
        (["--checkpoint", os.fspath(truncated), "--fasta", fasta, "--device", "cpu"], r"truncated\.pt' is truncated"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--checkpoint", checkpoint, "--fasta", fasta, "--device", "cuda"],
                      r"device 'cuda': no CUDA device is available"))
    out = tmp_path / "out"
    for argv, pattern in cases:
        assert cli.main(["fold", *argv, "-o", os.fspath(out)]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("af2-ext fold: error:"), err
        assert re.search(pattern, err[0]), (pattern, err[0])
        assert not out.exists()


def test_cli_keeps_existing_outputs_unless_overwrite(tmp_path, checkpoint, capsys):
    _needs_matplotlib()
    from af2_ext.app import cli

    out = tmp_path / "out"
    argv = ["fold", "--checkpoint", checkpoint, "--sequence", "MQIFVKTL", "-o", os.fspath(out), "--device", "cpu",
            "--mds-iters", "5"]
    assert cli.main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "query.pdb" in err[0] and "--overwrite" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli.main(argv + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def test_plots_with_and_without_truth(tmp_path):
    _needs_matplotlib()
    labels = utils.get_bucketed_distance_matrix(CA[None, :30].float())[0]
    logits = torch.nn.functional.one_hot(labels, utils.DISTOGRAM_BUCKETS).float() * 5.0
    result = fold.fold_sequence(_FixedDistogram(logits), SEQUENCE[:30], mds_iters=10)
    true = (CA[:30, None] - CA[None, :30]).norm(dim=-1)
    plots.plot_distogram(result, tmp_path / "d.png")
    plots.plot_distogram(result, tmp_path / "d_true.png", true)
    plots.plot_contacts(result, tmp_path / "c_true.png", true < 8.0, threshold=8.0)
    for name in ("d.png", "d_true.png", "c_true.png"):
        _assert_png(tmp_path / name)
    from PIL import Image

    assert Image.open(tmp_path / "d_true.png").size[0] > 1.5 * Image.open(tmp_path / "d.png").size[0], "side by side"
    contacts = result.contact_probabilities(8.0)
    assert float(((contacts > 0.5) == (true <= 8.0)).double().mean()) > 0.99
    with pytest.raises(ValueError, match=r"true_distances must be \(30, 30\)"):
        plots.plot_distogram(result, tmp_path / "bad.png", true[:29, :29])
    assert not (tmp_path / "bad.png").exists()


# ----------------------------------------------------------------------------------------------------------
# Relax (optional extra)
# ----------------------------------------------------------------------------------------------------------


def test_relax_ca_trace(tmp_path, monkeypatch):
    pytest.importorskip("openmm")
    pytest.importorskip("pdbfixer")
    monkeypatch.setenv("OPENMM_CPU_THREADS", "1")
    sequence = SEQUENCE[:20]
    trace = tmp_path / "trace.pdb"
    utils.write_pdb(trace, CA[:20], sequence)
    info = relax.relax_structure(trace, tmp_path / "relaxed.pdb", platform="CPU")
    assert info["rebuilt_backbone"] and info["energy_after"] < info["energy_before"]
    assert info["ca_shift"] < 1.0
    residues = _read_chain(tmp_path / "relaxed.pdb")
    assert [r.get_resname() for r in residues] == [utils.ONE_TO_THREE_LETTER_MAP[a] for a in sequence]
    for residue in residues:
        heavy = {a.get_id() for a in residue if a.element != "H"} - {"OXT"}
        expected = set(utils.BACKBONE_ATOM_NAMES) | set(utils.SC_ATOM_NAMES[residue.get_resname()])
        assert heavy == expected, residue
    relaxed = torch.tensor(np.array([[r[a].coord for a in ("N", "CA", "C")] for r in residues]), dtype=torch.float64)
    rmsd = (relaxed - BACKBONE[:20, :3]).square().sum(-1).mean().sqrt()
    assert rmsd < 1.0, f"relaxed N/CA/C {float(rmsd):.2f} Å from the real backbone"
    assert sorted(os.listdir(tmp_path)) == ["relaxed.pdb", "trace.pdb"], "no temporary file left"
