"""Fold sequences with a trained checkpoint: sequence -> distogram -> Cα trace -> PDB, plots and metrics.

    af2-ext fold --checkpoint run/checkpoint.pt --fasta seqs.fasta [--msa aln.a3m] [--reference ref.pdb]

For each sequence the model predicts the Cα-Cα distogram (the target ``af2-ext train`` bins); its expected
distances and confidences (:func:`af2_ext.utils.center_distogram_torch`) go to weighted metric MDS
(:func:`af2_ext.utils.MDScaling`), which gives a Cα trace up to its mirror image; the mirror is chosen from the
trace's Cα virtual torsions (:func:`choose_handedness`). Written to ``--output-dir``: ``NAME.pdb`` (the Cα
trace), ``NAME_distogram.png``, ``NAME_contacts.png`` (:mod:`af2_ext.app.plots`), ``NAME_metrics.json`` and,
with ``--relax``, ``NAME_relaxed.pdb`` (:mod:`af2_ext.app.relax`; needs ``af2_ext[relax]``). With
``--reference`` (PDB or mmCIF of the same sequence, read by :func:`af2_ext.app.structure.read_structure`) the
metrics are RMSD after the RMSD-optimal superposition, the standard GDT-TS and TM-score (each under the
superposition that maximises it: :mod:`af2_ext.structure_scores`), lDDT-Cα and distogram accuracy.

Sequences, alignments and tokens: :mod:`af2_ext.app.sequences`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import warnings
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from af2_ext import utils
from af2_ext.app.checkpoint import load_model
from af2_ext.app.plots import plot_contacts, plot_distogram
from af2_ext.app.relax import relax_structure, relax_modules
from af2_ext.app.sequences import check_letters, read_fasta, read_msa, tokenize
from af2_ext.app.structure import read_structure, write_ca_trace
from af2_ext.devices import resolve_device
from af2_ext.fileio import PathLike, check_input_file, write_json_atomic
from af2_ext.residue_constants import CONTACT_THRESHOLD, DISTANCE_THRESHOLDS, MAX_NUM_MSA, UNKNOWN_LETTERS
from af2_ext.structure_scores import GDT_TS_DEFINITION, TM_SCORE_DEFINITION

__all__ = [
    "DEFAULT_MDS_ITERS", "FoldResult", "FoldOutput", "ReferenceChain", "fold_sequence", "choose_handedness",
    "write_structure", "read_reference", "true_distances", "compare_to_reference", "fold_from_checkpoint",
    "add_fold_arguments", "run_fold",
]

DEFAULT_MDS_ITERS = 300
MDS_TOL = 1e-6


# ----------------------------------------------------------------------------------------------------------
# Folding
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FoldResult:
    """One folded sequence; tensors on the CPU, float32.

    Attributes:
        name, sequence: the record (sequence upper-cased).
        logits, probs: (n, n, 37) distogram logits and probabilities.
        distances, weights: (n, n) expected Cα-Cα distance (Å) and its MDS weight ``1 / (1 + std)``.
        coords: (n, 3) Cα trace in Å, centered.
        stress: final weighted MDS stress.
        chirality: Cα-torsion handedness score of ``coords`` in [-1, 1] (see :func:`choose_handedness`).
        mirrored: whether the MDS solution was mirrored to get it.
    """

    name: str
    sequence: str
    logits: torch.Tensor
    probs: torch.Tensor
    distances: torch.Tensor
    weights: torch.Tensor
    coords: torch.Tensor
    stress: float
    chirality: float
    mirrored: bool

    def contact_probabilities(self, threshold: float = CONTACT_THRESHOLD) -> torch.Tensor:
        """(n, n) predicted P(d <= threshold): the mass of the classes whose upper edge is <= threshold."""
        upper = DISTANCE_THRESHOLDS.clone()
        upper[-1] = float("inf")  # the last class is open
        return self.probs[..., upper <= threshold + 1e-6].sum(dim=-1)


def _ca_torsions(coords: torch.Tensor) -> torch.Tensor:
    """Virtual torsions CA(i)-CA(i+1)-CA(i+2)-CA(i+3) of an (n, 3) trace, in degrees, (n - 3,)."""
    return torch.rad2deg(utils.get_dihedral_torch(coords[:-3], coords[1:-2], coords[2:-1], coords[3:]))


def choose_handedness(coords: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """Pick the mirror image of an (n, 3) Cα trace that looks like a protein.

    Distances cannot tell a structure from its mirror image, and ``MDScaling(fix_mirror=...)`` needs N/CA/C to
    read phi. A Cα trace has its virtual torsions instead: right-handed α-helices sit at +20..+80° and
    β-strands at -180..-100°; mirroring flips every sign. The score is (in those windows - in the mirrored
    windows) / torsions; the trace is mirrored (z -> -z) when its score is negative. On chain A of twelve
    PDB structures (28-436 residues, all-α to mostly-β) the true chirality scores 0.47-0.70.

    Returns:
        (coords, score of the returned coords, whether it was mirrored). Fewer than 4 residues: unchanged, 0.
    """
    if coords.shape[0] < 4:
        return coords, 0.0, False
    torsion = _ca_torsions(coords.double())
    native = ((torsion > 20) & (torsion < 80)) | (torsion < -100)
    mirror = ((torsion < -20) & (torsion > -80)) | (torsion > 100)
    score = float((native.sum() - mirror.sum()) / torsion.numel())
    if score < 0:
        return coords * coords.new_tensor([1.0, 1.0, -1.0]), -score, True
    return coords, score, False


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def fold_sequence(model: torch.nn.Module, sequence: str, *, msa: Optional[torch.Tensor] = None, name: str = "query",
                  device: Union[str, torch.device, None] = None, mds_iters: int = DEFAULT_MDS_ITERS, seed: int = 0,
                  query_as_msa: bool = True) -> FoldResult:
    """Predict the distogram of one sequence and turn it into a Cα trace.

    Args:
        model: an ``Alphafold2`` (eval mode is set here).
        sequence: one-letter codes (any case).
        msa: optional (M, N = n) tokens (:func:`read_msa`); more than 20 rows: the first 20, with a warning.
        name: the record's name.
        device: where the model runs (it is moved there); None: where the model is.
        mds_iters: SMACOF iterations (stops earlier once the relative stress decrease is below 1e-6).
        seed: torch seed of the forward pass (the global RNG state is restored afterwards).
        query_as_msa: without ``msa``, give the query as the MSA's single row, as ``af2-ext train`` does by
            default (its ``msa="single"``); False feeds no MSA (``msa="none"``).
    """
    tokens = tokenize(sequence)
    sequence = sequence.upper()
    n = tokens.numel()
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None and n > max_len:
        raise ValueError(f"sequence {name!r} has {n} residues; the model accepts at most max_seq_len={max_len}")
    if msa is not None:
        if not isinstance(msa, torch.Tensor) or msa.dim() != 2 or msa.dtype != torch.long:
            raise ValueError(f"msa must be (M, N) int64 tokens (read_msa), got {getattr(msa, 'shape', type(msa))}")
        if msa.shape[1] != n:
            raise ValueError(f"the MSA has {msa.shape[1]} columns but sequence {name!r} has {n} residues")
        if msa.shape[0] > MAX_NUM_MSA:
            warnings.warn(f"the MSA has {msa.shape[0]} rows; folding {name!r} with the first {MAX_NUM_MSA}",
                          RuntimeWarning, stacklevel=2)
            msa = msa[:MAX_NUM_MSA]
    elif query_as_msa:
        msa = tokens[None]  # [1, n]
    device = _model_device(model) if device is None else torch.device(device)
    model.to(device).eval()
    seq = tokens[None].to(device)  # [1, n]
    msa = None if msa is None else msa[None].to(device)  # [1, M, n]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
        torch.manual_seed(seed)
        logits = model(seq, msa=msa).float().cpu()[0]  # [n, n, 37]

    probs = logits.double().softmax(dim=-1)
    distances, weights = utils.center_distogram_torch(probs)  # [1, n, n] each
    coords, stresses = utils.MDScaling(distances, weights, iters=mds_iters, tol=MDS_TOL, batched=True)
    # coords [1, 3, n], stresses [1, steps]
    coords, chirality, mirrored = choose_handedness(coords[0].T)  # [n, 3]
    return FoldResult(name=name, sequence=sequence, logits=logits, probs=probs.float(), distances=distances[0].float(),
                      weights=weights[0].float(), coords=coords.float(), stress=float(stresses[0, -1]),
                      chirality=chirality, mirrored=mirrored)


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def write_structure(result: FoldResult, path: PathLike) -> str:
    """Write the Cα trace of ``result`` as a PDB file (atomically); returns the path."""
    return write_ca_trace(path, result.sequence, result.coords)


# ----------------------------------------------------------------------------------------------------------
# Reference structures and metrics
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ReferenceChain:
    """Observed residues of one chain: ``ca`` (L, 3) float64 Å, ``present`` (L,) residues with a Cα."""

    chain: str
    sequence: str
    ca: torch.Tensor
    present: torch.Tensor


def read_reference(path: PathLike) -> list[ReferenceChain]:
    """The protein chains of the first model of a PDB or mmCIF file (``.gz`` too), read by
    :func:`af2_ext.app.structure.read_structure` as ``af2-ext build-dataset`` reads it; each chain's residues
    are those observed in the file."""
    path = check_input_file(path, "reference structure")
    try:
        structure = read_structure(path)
    except Exception as error:  # what reading or Biopython raises on a file that is not a structure
        why = str(error) if type(error) is ValueError else f"{type(error).__name__}: {error}"
        raise ValueError(f"reference structure {path!r} could not be read: {why}") from error
    chains = []
    for chain in structure.chains:
        residues = chain.observed
        if residues:
            ca = [r.atoms.get("CA", np.zeros(3)) for r in residues]
            chains.append(ReferenceChain(chain.id, "".join(r.letter for r in residues),
                                         torch.tensor(np.array(ca), dtype=torch.float64),
                                         torch.tensor(["CA" in r.atoms for r in residues])))
    if not chains:
        raise ValueError(f"reference structure {path!r} has no protein chain")
    return chains


def _same_sequence(a: str, b: str) -> bool:
    unknown = set(UNKNOWN_LETTERS)
    return len(a) == len(b) and all(x == y or x in unknown or y in unknown for x, y in zip(a, b))


def _preview(sequence: str, length: int = 12) -> str:
    return sequence if len(sequence) <= length else f"{sequence[:length]}..."


def _match_chain(chains: Sequence[ReferenceChain], path: PathLike, name: str, sequence: str,
                 chain: Optional[str]) -> ReferenceChain:
    """The reference chain for a sequence: ``chain`` if given, else the first whose sequence matches."""
    path = os.fspath(path)
    listing = ", ".join(f"{c.chain} ({len(c.sequence)} residues: {_preview(c.sequence)})" for c in chains)
    if chain is not None:
        found = [c for c in chains if c.chain == chain]
        if not found:
            raise ValueError(f"reference {path!r} has no protein chain {chain!r}; chains: {listing}")
        candidates = found
    else:
        candidates = chains
    for candidate in candidates:
        if _same_sequence(candidate.sequence, sequence):
            return candidate
    which = f"chain {chain!r}" if chain is not None else "no chain"
    raise ValueError(f"reference {path!r}: {which} matches the sequence of {name!r} ({len(sequence)} residues: "
                     f"{_preview(sequence)}); the reference's observed residues must be the same sequence. "
                     f"Chains: {listing}")


def true_distances(reference: ReferenceChain) -> torch.Tensor:
    """(L, L) Cα distances of a reference chain, NaN where a residue has no Cα."""
    ca = reference.ca
    distances = (ca[:, None] - ca[None]).norm(dim=-1)
    known = reference.present[:, None] & reference.present[None]
    return distances.masked_fill(~known, float("nan"))


def _check_alignable(reference: ReferenceChain, path: PathLike) -> ReferenceChain:
    if int(reference.present.sum()) < 3:
        raise ValueError(f"reference {os.fspath(path)!r}, chain {reference.chain!r}: fewer than 3 residues with a Cα")
    return reference


# What the report's superposition-based scores are; written into every metrics file and under the table.
SCORE_DEFINITIONS = {
    "rmsd": "RMSD after the RMSD-optimal (Kabsch) superposition",
    "gdt_ts": GDT_TS_DEFINITION,
    "tm_score": TM_SCORE_DEFINITION,
}


def _compare(result: FoldResult, reference: ReferenceChain, path: PathLike) -> dict:
    present = _check_alignable(reference, path).present
    pred = result.coords.double()
    model, truth = pred[present].T, reference.ca[present].T  # [3, k] each: the residues the reference has
    aligned, centred = utils.Kabsch(model, truth)
    labels = utils.get_bucketed_distance_matrix(reference.ca[None], present[None])[0]  # [n, n]
    labels.fill_diagonal_(-100)  # i == j carries no information (the trainer ignores it too)
    return {
        "reference": os.fspath(path),
        "chain": reference.chain,
        "residues": len(reference.sequence),
        "aligned_residues": int(present.sum()),
        "rmsd": float(utils.RMSD(aligned, centred)[0]),
        # The standard scores, not the seed's utils.GDT / utils.TMscore after Kabsch: that superposition is
        # pulled by a model's wrong parts and understates everything but near-perfect models.
        "gdt_ts": float(utils.gdt_ts(model, truth)),
        "tm_score": float(utils.tm_score(model, truth)),
        "lddt_ca": float(utils.lddt_ca(pred, reference.ca, present)),
        "distogram_accuracy": float(utils.distogram_accuracy(result.logits, labels)),
        **{f"{key}_definition": text for key, text in SCORE_DEFINITIONS.items()},
    }


def compare_to_reference(result: FoldResult, reference_path: PathLike, chain: Optional[str] = None) -> dict:
    """Metrics of ``result`` against a PDB/mmCIF reference of the same sequence.

    The chain is ``chain``, or the first whose observed residues spell the same sequence (X matches anything);
    otherwise a ValueError names the file and its chains. Residues without a Cα are left out.

    Returns:
        dict: reference, chain, residues, aligned_residues, rmsd (Å, after Kabsch), gdt_ts and tm_score (the
        standard scores, each under the superposition that maximises it: :func:`utils.gdt_ts`,
        :func:`utils.tm_score`; TM-score normalised by the aligned residues), lddt_ca, distogram_accuracy
        (argmax class vs the true Cα distance's, i != j), and ``rmsd_definition`` / ``gdt_ts_definition`` /
        ``tm_score_definition`` saying which definition each number is.
    """
    chains = read_reference(reference_path)
    return _compare(result, _match_chain(chains, reference_path, result.name, result.sequence, chain), reference_path)


# ----------------------------------------------------------------------------------------------------------
# Whole runs: checkpoint + sequences -> files
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FoldOutput:
    """What :func:`fold_from_checkpoint` made for one sequence: the result, file paths by kind ("pdb",
    "distogram", "contacts", "metrics", "relaxed") and the metrics JSON's content."""

    result: FoldResult
    files: dict
    metrics: dict


def _resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    return resolve_device(device)  # a ValueError naming a device that is not there, before the checkpoint


def _records(sequences) -> list[tuple[str, str]]:
    """sequences as (name, SEQUENCE) pairs: a str, a {name: sequence} mapping, or an iterable of str /
    (name, sequence)."""
    if isinstance(sequences, str):
        items = [("query", sequences)]
    elif isinstance(sequences, Mapping):
        items = list(sequences.items())
    else:
        items = [(f"seq{k + 1}", s) if isinstance(s, str) else tuple(s) for k, s in enumerate(sequences)]
    if not items:
        raise ValueError("no sequence to fold")
    records = []
    for name, sequence in items:
        if not isinstance(sequence, str) or not sequence:
            raise ValueError(f"sequence {name!r} must be a non-empty str of one-letter codes, got {sequence!r}")
        records.append((str(name), check_letters(sequence, f"sequence {name!r}")))
    return records


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "sequence"


def _output_paths(output_dir: PathLike, stem: str, relax: bool) -> list[str]:
    """The files fold_from_checkpoint writes for one sequence."""
    suffixes = (".pdb", "_distogram.png", "_contacts.png", "_metrics.json") + (("_relaxed.pdb",) if relax else ())
    return [os.path.join(os.fspath(output_dir), stem + suffix) for suffix in suffixes]


def _list_paths(paths: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _finite(value):
    """JSON-safe: NaN/inf -> None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def fold_from_checkpoint(checkpoint: PathLike, sequences, output_dir: PathLike = "fold_out", *,
                         msa: Union[PathLike, torch.Tensor, None] = None, reference: Optional[PathLike] = None,
                         chain: Optional[str] = None, device: Union[str, torch.device, None] = "auto",
                         mds_iters: int = DEFAULT_MDS_ITERS, relax: bool = False, seed: int = 0,
                         progress: bool = True, overwrite: bool = True) -> list[FoldOutput]:
    """Fold sequences with a checkpoint and write NAME.pdb, NAME_distogram.png, NAME_contacts.png,
    NAME_metrics.json (and NAME_relaxed.pdb with ``relax``) into ``output_dir``.

    Args:
        checkpoint: an ``af2-ext train`` checkpoint.
        sequences: a sequence (named "query"), {name: sequence}, or an iterable of sequences or (name, sequence)
            (e.g. :func:`read_fasta`'s records).
        msa: an alignment file or (M, N) tokens; only with a single sequence.
        reference: PDB/mmCIF of the true structure: every sequence must match one of its chains (``chain``
            picks one); checked before anything is folded.
        device: "auto" (CUDA when available), "cpu", "cuda", ...
        mds_iters, seed: as :func:`fold_sequence`.
        relax: also write the Amber-relaxed all-atom model (needs ``af2_ext[relax]``).
        progress: a tqdm bar when there is more than one sequence.
        overwrite: replace files of the same names in ``output_dir``; False (the command line's default)
            refuses, before anything is read, when any of them exists.
    """
    records = _records(sequences)
    stems = [_file_stem(name) for name, _ in records]
    written = stems + ([f"{s}_relaxed" for s in stems] if relax else [])  # NAME_relaxed.pdb must not clash either
    duplicates = sorted({s for s in written if written.count(s) > 1})
    if duplicates:
        raise ValueError(f"sequence names must give distinct file names, got duplicates {duplicates}")
    if not overwrite:
        existing = [path for stem in stems for path in _output_paths(output_dir, stem, relax)
                    if os.path.lexists(path)]
        if existing:
            raise ValueError(f"{_list_paths(existing)} already exist(s); replace with --overwrite, or choose "
                             "another --output-dir")
    if msa is not None:
        if len(records) > 1:
            raise ValueError(f"an MSA goes with one sequence, got {len(records)} sequences")
        if not isinstance(msa, torch.Tensor):
            msa = read_msa(msa)
        if msa.dim() != 2 or msa.shape[1] != len(records[0][1]):
            raise ValueError(f"the MSA has {msa.shape[-1]} columns but sequence {records[0][0]!r} has "
                             f"{len(records[0][1])} residues")
    if relax:
        relax_modules()  # fail before folding
        unknown = [name for name, sequence in records if set(sequence) & set(UNKNOWN_LETTERS)]
        if unknown:
            raise ValueError(f"relax needs the 20 standard residues; {unknown} have unknown ones "
                             f"({'/'.join(UNKNOWN_LETTERS)})")
        short = [name for name, sequence in records if len(sequence) < 2]
        if short:
            raise ValueError(f"relax needs at least 2 residues; {short} have 1")
    device = _resolve_device(device)
    model, ckpt = load_model(checkpoint, map_location=device)
    for name, sequence in records:
        if len(sequence) > model.max_seq_len:
            raise ValueError(f"sequence {name!r} has {len(sequence)} residues; checkpoint {os.fspath(checkpoint)!r} "
                             f"was built for at most max_seq_len={model.max_seq_len}")
    query_as_msa = (ckpt.get("config") or {}).get("msa", "single") == "single"
    chains = read_reference(reference) if reference is not None else None
    matched = [_check_alignable(_match_chain(chains, reference, name, sequence, chain), reference) if chains else None
               for name, sequence in records]

    output_dir = os.fspath(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:  # a file in the way, no permission, ...
        raise ValueError(f"output directory {output_dir!r} cannot be created: {error}") from error
    outputs = []
    bar = tqdm(list(zip(records, stems, matched)), desc="fold", unit="seq", disable=not progress or len(records) < 2)
    for (name, sequence), stem, truth in bar:
        result = fold_sequence(model, sequence, msa=msa, name=name, device=device, mds_iters=mds_iters, seed=seed,
                               query_as_msa=query_as_msa)
        files = {kind: os.path.join(output_dir, f"{stem}{suffix}") for kind, suffix in (
            ("pdb", ".pdb"), ("distogram", "_distogram.png"), ("contacts", "_contacts.png"),
            ("metrics", "_metrics.json"))}
        write_structure(result, files["pdb"])
        true_dist = true_distances(truth) if truth is not None else None
        plot_distogram(result, files["distogram"], true_dist)
        true_contacts = None if true_dist is None else torch.where(  # unknown stays NaN (blank)
            true_dist.isnan(), true_dist, (true_dist <= CONTACT_THRESHOLD).double())
        plot_contacts(result, files["contacts"], true_contacts)
        metrics = {
            "name": name, "sequence": sequence, "length": len(sequence),
            "checkpoint": os.fspath(checkpoint), "checkpoint_step": ckpt.get("step"), "device": str(device),
            "seed": seed, "msa_rows": None if msa is None else int(min(msa.shape[0], MAX_NUM_MSA)),
            "mds_iters": mds_iters, "mds_stress": result.stress, "chirality": result.chirality,
            "mirrored": result.mirrored,
            "reference": _compare(result, truth, reference) if truth is not None else None,
            "relax": None,
        }
        if relax:
            files["relaxed"] = os.path.join(output_dir, f"{stem}_relaxed.pdb")
            metrics["relax"] = relax_structure(files["pdb"], files["relaxed"])
        metrics["files"] = dict(files)
        metrics = _finite(metrics)
        write_json_atomic(files["metrics"], metrics)
        outputs.append(FoldOutput(result=result, files=files, metrics=metrics))
    return outputs


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def add_fold_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``af2-ext fold`` options."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by af2-ext train")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--fasta", metavar="FILE", help="FASTA file of the sequences to fold")
    source.add_argument("--sequence", metavar="SEQ", help="one sequence (one-letter codes), folded as 'query'")
    parser.add_argument("--msa", metavar="FILE", help="aligned FASTA or A3M for the (single) sequence; "
                                                      "default: the query as the only row, as in training")
    parser.add_argument("--reference", metavar="PDB", help="true structure (PDB or mmCIF) to score against")
    parser.add_argument("--chain", help="chain of --reference (default: the chain with the same sequence)")
    parser.add_argument("-o", "--output-dir", default="fold_out", help="output directory (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--mds-iters", type=int, default=DEFAULT_MDS_ITERS,
                        help="MDS (SMACOF) iterations (default: %(default)s)")
    parser.add_argument("--relax", action="store_true",
                        help="also write NAME_relaxed.pdb: backbone rebuilt, side chains added, Amber-minimised "
                             "(needs af2_ext[relax]: openmm, pdbfixer)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the forward pass (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files of the same names (default: refuse when any exists)")


def _metrics_table(outputs: Sequence[FoldOutput]) -> str:
    columns = (("RMSD Å", "rmsd", "{:.2f}"), ("GDT-TS", "gdt_ts", "{:.3f}"), ("TM-score", "tm_score", "{:.3f}"),
               ("lDDT-Cα", "lddt_ca", "{:.3f}"), ("dist. acc.", "distogram_accuracy", "{:.3f}"))
    width = max(4, *(len(o.result.name) for o in outputs))
    lines = [f"{'name':<{width}}  {'len':>4}  " + "  ".join(f"{title:>10}" for title, _, _ in columns)]
    for output in outputs:
        ref = output.metrics["reference"]
        cells = ["-" if ref.get(key) is None else fmt.format(ref[key]) for _, key, fmt in columns]
        lines.append(f"{output.result.name:<{width}}  {len(output.result.sequence):>4}  "
                     + "  ".join(f"{c:>10}" for c in cells))
    lines += [f"{title}: {SCORE_DEFINITIONS[key]}" for title, key, _ in columns if key in SCORE_DEFINITIONS]
    return "\n".join(lines)


def run_fold(args: argparse.Namespace) -> int:
    """``af2-ext fold``: fold, write the files, print where they are (and the metrics with --reference)."""
    records = read_fasta(args.fasta) if args.fasta else [("query", args.sequence)]
    if args.mds_iters < 0:
        raise ValueError(f"--mds-iters must be >= 0, got {args.mds_iters}")
    try:
        outputs = fold_from_checkpoint(args.checkpoint, records, args.output_dir, msa=args.msa,
                                       reference=args.reference, chain=args.chain, device=args.device,
                                       mds_iters=args.mds_iters, relax=args.relax, seed=args.seed,
                                       overwrite=args.overwrite)
    except ImportError as error:  # the relax extra: one clear line from the CLI
        raise ValueError(str(error)) from error
    for output in outputs:
        files = output.files
        print(f"{output.result.name} ({len(output.result.sequence)} residues): {files['pdb']}, "
              f"{files['distogram']}, {files['contacts']}, {files['metrics']}"
              + (f", {files['relaxed']}" if "relaxed" in files else ""))
    if args.reference:
        print(_metrics_table(outputs))
    sys.stdout.flush()
    return 0
