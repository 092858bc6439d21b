"""Fold sequences with a trained checkpoint: sequence -> distogram -> Cα trace -> PDB, plots and metrics.

    af2-ext fold --checkpoint run/checkpoint.pt --fasta seqs.fasta [--msa aln.a3m] [--reference ref.pdb]

For each sequence the model predicts the Cα-Cα distogram (the target ``af2-ext train`` bins); its expected
distances and confidences (:func:`af2_ext.utils.center_distogram_torch`) go to weighted metric MDS
(:func:`af2_ext.utils.MDScaling`), which gives a Cα trace up to its mirror image; the mirror is chosen from the
trace's Cα virtual torsions (:func:`choose_handedness`). Written to ``--output-dir``: ``NAME.pdb`` (the Cα
trace), ``NAME_distogram.png``, ``NAME_contacts.png``, ``NAME_metrics.json`` and, with ``--relax``,
``NAME_relaxed.pdb`` (backbone rebuilt, side chains added, Amber-minimised; needs ``af2_ext[relax]``). With
``--reference`` (PDB or mmCIF of the same sequence) the metrics are RMSD after the RMSD-optimal superposition,
the standard GDT-TS and TM-score (each under the superposition that maximises it: :mod:`af2_ext.structure_scores`),
lDDT-Cα and distogram accuracy.

Tokens are the training vocabulary: 0..19 the amino acids in ``AA_ORDER``, 20 anything else (X, the ambiguity
codes B Z J U O, and MSA gaps: the model has no separate gap token).
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
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
from af2_ext.devices import resolve_device
from af2_ext.fileio import atomic_open, check_input_file, save_figure_atomic, write_json_atomic
from af2_ext.structure_scores import GDT_TS_DEFINITION, TM_SCORE_DEFINITION

PathLike = Union[str, os.PathLike]

UNKNOWN_TOKEN = 20
GAP_TOKEN = UNKNOWN_TOKEN  # the model's vocabulary has 21 tokens: a gap reads as "not one of the 20"
UNKNOWN_LETTERS = "XBZJUO"  # X and the IUPAC ambiguity / rare codes, all folded as unknown
MAX_MSA_ROWS = 20  # Alphafold2's MAX_NUM_MSA
DEFAULT_MDS_ITERS = 300
MDS_TOL = 1e-6
CONTACT_THRESHOLD = 8.0

_TOKEN = {letter: index for index, letter in enumerate(utils.AA_ORDER)}
_TOKEN.update({letter: UNKNOWN_TOKEN for letter in UNKNOWN_LETTERS})
_ALLOWED = f"the 20 amino-acid one-letter codes {utils.AA_ORDER}, or {'/'.join(UNKNOWN_LETTERS)} for unknown"

# ----------------------------------------------------------------------------------------------------------
# Sequences and alignments
# ----------------------------------------------------------------------------------------------------------


def _check_letters(sequence: str, where: str, extra: str = "") -> str:
    """Upper-cased ``sequence``; a ValueError naming ``where`` and the first bad letter otherwise."""
    sequence = sequence.upper()
    for position, letter in enumerate(sequence, start=1):
        if letter not in _TOKEN and letter not in extra:
            bad = sorted(set(sequence) - set(_TOKEN) - set(extra))
            raise ValueError(f"{where}: invalid character {letter!r} at position {position} (all invalid: "
                             f"{''.join(bad)!r}); expected {_ALLOWED}{extra and f', or {extra!r}'}")
    return sequence


def tokenize(sequence: str) -> torch.Tensor:
    """One-letter sequence (any case) -> (n,) int64 tokens: ``AA_ORDER`` index, 20 for X/B/Z/J/U/O."""
    if not isinstance(sequence, str):
        raise TypeError(f"sequence must be a str of one-letter codes, got {type(sequence).__name__}")
    if not sequence:
        raise ValueError("sequence is empty")
    sequence = _check_letters(sequence, "sequence")
    return torch.tensor([_TOKEN[letter] for letter in sequence], dtype=torch.long)


def _read_text(path: str, kind: str) -> str:
    """The text of a file (gzip-compressed when named ``.gz``; a UTF-8 byte-order mark is dropped); a ValueError
    naming the file when it is not readable text."""
    try:
        with (gzip.open(path, "rt", encoding="utf-8-sig") if path.lower().endswith(".gz")
              else open(path, encoding="utf-8-sig")) as handle:
            return handle.read()
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as error:
        raise ValueError(f"{kind} file {path!r} is not a text file ({type(error).__name__}: {error})") from error


def _read_records(path: PathLike, kind: str) -> list[tuple[str, str, int]]:
    """(name, raw sequence text, header line) of each '>' record of a FASTA-like file (``.gz`` too)."""
    path = check_input_file(path, f"{kind} file")
    lines = _read_text(path, kind).splitlines()
    records: list[tuple[str, list[str], int]] = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith(";") or line.startswith("#"):
            continue
        if line.startswith(">"):
            name = line[1:].split()[0] if line[1:].split() else f"record{len(records) + 1}"
            records.append((name, [], number))
        elif not records:
            raise ValueError(f"{kind} file {path!r}, line {number}: sequence data before the first '>' header")
        else:
            records[-1][1].append("".join(line.split()))
    if not records:
        raise ValueError(f"{kind} file {path!r} is empty (no '>' record)")
    return [(name, "".join(parts), number) for name, parts, number in records]


def read_fasta(path: PathLike) -> list[tuple[str, str]]:
    """Records of a FASTA file as ``(name, sequence)``: the name is the header's first word, the sequence
    upper-cased (a trailing ``*`` is dropped). Errors name the file and the record."""
    out = []
    for name, text, line in _read_records(path, "FASTA"):
        text = text[:-1] if text.endswith("*") else text
        where = f"FASTA file {os.fspath(path)!r}, record {name!r} (line {line})"
        if not text:
            raise ValueError(f"{where}: empty sequence")
        out.append((name, _check_letters(text, where)))
    return out


def read_msa(path: PathLike, *, format: str = "auto") -> torch.Tensor:
    """An alignment as (M, N) int64 tokens, the first record first (put the query there).

    Args:
        path: aligned FASTA (every row the same length; ``-`` or ``.`` gaps) or A3M (upper case and ``-`` are
            match columns, lower case and ``.`` are insertions and are removed).
        format: "fasta", "a3m" or "auto": A3M for a ``.a3m`` file or when the rows only line up once lower
            case is removed, else aligned FASTA.

    Gaps become token 20 (``GAP_TOKEN``), the same token as an unknown residue: the model has no other.
    """
    if format not in ("auto", "fasta", "a3m"):
        raise ValueError(f"format must be 'auto', 'fasta' or 'a3m', got {format!r}")
    path = os.fspath(path)
    records = _read_records(path, "MSA")
    if format == "auto":
        lengths = {len(text) for _, text, _ in records}
        match_lengths = {len(re.sub(r"[a-z.]", "", text)) for _, text, _ in records}
        is_a3m = path.lower().endswith((".a3m", ".a3m.gz")) or (len(lengths) > 1 and len(match_lengths) == 1)
        format = "a3m" if is_a3m else "fasta"
    rows = []
    for name, text, line in records:
        text = re.sub(r"[a-z.]", "", text) if format == "a3m" else text.upper().replace(".", "-")
        where = f"MSA file {path!r}, record {name!r} (line {line})"
        if not text:
            raise ValueError(f"{where}: empty row")
        text = _check_letters(text, where, extra="-")
        if rows and len(text) != len(rows[0]):
            raise ValueError(f"{where}: {len(text)} aligned columns, but the first row has {len(rows[0])} "
                             f"(read as {format}; A3M insertions must be lower case)")
        rows.append(text)
    return torch.tensor([[GAP_TOKEN if c == "-" else _TOKEN[c] for c in row] for row in rows], dtype=torch.long)


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
        upper = utils.DISTANCE_THRESHOLDS.clone()
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
        if msa.shape[0] > MAX_MSA_ROWS:
            warnings.warn(f"the MSA has {msa.shape[0]} rows; folding {name!r} with the first {MAX_MSA_ROWS}",
                          RuntimeWarning, stacklevel=2)
            msa = msa[:MAX_MSA_ROWS]
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
    coords, stresses = utils.MDScaling(distances, weights, iters=mds_iters, tol=MDS_TOL)
    coords, chirality, mirrored = choose_handedness(coords[0].T)  # [n, 3]
    return FoldResult(name=name, sequence=sequence, logits=logits, probs=probs.float(), distances=distances[0].float(),
                      weights=weights[0].float(), coords=coords.float(), stress=float(stresses[0, -1]),
                      chirality=chirality, mirrored=mirrored)


# ----------------------------------------------------------------------------------------------------------
# Output: PDB and plots
# ----------------------------------------------------------------------------------------------------------


def _pdb_text(sequence: str, atoms: Sequence[Mapping[str, np.ndarray]], chain_id: str = "A") -> str:
    """:func:`utils.pdb_chain_text` of one chain; unknown letters are written as UNK (``utils.write_pdb`` takes
    the 20 standard residues only)."""
    residues = [utils.ONE_TO_THREE_LETTER_MAP.get(letter, "UNK") for letter in sequence]
    return utils.pdb_chain_text(residues, atoms, chain_id=chain_id)


def write_ca_trace(path: PathLike, sequence: str, ca) -> str:
    """Write a Cα trace ((n, 3) Å, one row per residue of ``sequence``) as a PDB file (atomically)."""
    coords = torch.as_tensor(ca).double().cpu().numpy()
    if coords.shape != (len(sequence), 3):
        raise ValueError(f"ca must be ({len(sequence)}, 3) for a sequence of {len(sequence)}, got {coords.shape}")
    with atomic_open(path) as handle:
        handle.write(_pdb_text(sequence, [{"CA": xyz} for xyz in coords]))
    return os.fspath(path)


def write_structure(result: FoldResult, path: PathLike) -> str:
    """Write the Cα trace of ``result`` as a PDB file (atomically); returns the path."""
    return write_ca_trace(path, result.sequence, result.coords)


def _figure(panels: int):
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the fold plots need matplotlib: pip install matplotlib") from error
    fig = Figure(figsize=(5.2 * panels, 4.4))
    return fig, [fig.add_subplot(1, panels, k + 1) for k in range(panels)]


def _draw_maps(path: PathLike, title: str, maps: Sequence[tuple[str, np.ndarray]], label: str, cmap: str,
               vmin: float, vmax: float) -> str:
    fig, axes = _figure(len(maps))
    for ax, (panel_title, values) in zip(axes, maps):
        image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", origin="upper")
        ax.set_title(panel_title)
        ax.set_xlabel("residue j")
        ax.set_ylabel("residue i")
        fig.colorbar(image, ax=ax, label=label, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return os.fspath(path)


def _square(name: str, value, n: int) -> np.ndarray:
    array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    if array.shape != (n, n):
        raise ValueError(f"{name} must be ({n}, {n}), got {array.shape}")
    return array


def plot_distogram(result: FoldResult, path: PathLike, true_distances=None) -> str:
    """PNG of the predicted expected Cα distances, beside ``true_distances`` (n, n) when given (NaN = unknown)."""
    n = len(result.sequence)
    maps = [("predicted (expected distance)", result.distances.double().numpy())]
    if true_distances is not None:
        maps.append(("true Cα distances", _square("true_distances", true_distances, n)))
    vmax = float(utils.DISTANCE_THRESHOLDS[-1])
    return _draw_maps(path, f"{result.name}: distogram", maps, "Å", "viridis_r", 0.0, vmax)


def plot_contacts(result: FoldResult, path: PathLike, true_contacts=None, threshold: float = CONTACT_THRESHOLD) -> str:
    """PNG of the predicted contact probability P(d <= threshold), beside the true (n, n) contact map."""
    n = len(result.sequence)
    maps = [(f"predicted P(d <= {threshold:g} Å)", result.contact_probabilities(threshold).double().numpy())]
    if true_contacts is not None:
        maps.append((f"true contacts (d <= {threshold:g} Å)", _square("true_contacts", true_contacts, n)))
    return _draw_maps(path, f"{result.name}: contacts", maps, "probability", "Greys", 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Reference structures and metrics
# ----------------------------------------------------------------------------------------------------------

_MODIFIED = {"MSE": "M", "SEC": "U", "PYL": "O"}


@dataclasses.dataclass
class ReferenceChain:
    """Observed residues of one chain: ``ca`` (L, 3) float64 Å, ``present`` (L,) residues with a Cα."""

    chain: str
    sequence: str
    ca: torch.Tensor
    present: torch.Tensor


def read_reference(path: PathLike) -> list[ReferenceChain]:
    """Protein chains of the first model of a PDB or mmCIF file (``.cif``/``.mmcif``; ``.gz`` too), by Biopython."""
    from Bio.PDB import MMCIFParser, PDBParser
    from Bio.PDB.Polypeptide import is_aa

    path = check_input_file(path, "reference structure")
    stem = path[:-3] if path.lower().endswith(".gz") else path
    parser = MMCIFParser(QUIET=True) if stem.lower().endswith((".cif", ".mmcif")) else PDBParser(QUIET=True)
    text = _read_text(path, "reference structure")
    try:
        structure = parser.get_structure("reference", io.StringIO(text))
        model = next(iter(structure))
    except Exception as error:  # Biopython raises several types for malformed files
        raise ValueError(f"reference structure {path!r} could not be read: {error}") from error
    chains = []
    for chain in model:
        letters, ca, present = [], [], []
        for residue in chain:
            name = residue.get_resname()
            if not (residue.id[0] == " " or name in _MODIFIED) or not is_aa(residue, standard=False):
                continue  # waters, ligands
            letters.append(utils.THREE_TO_ONE_LETTER_MAP.get(name, _MODIFIED.get(name, "X")))
            present.append("CA" in residue)
            ca.append(residue["CA"].coord if "CA" in residue else np.zeros(3))
        if letters:
            chains.append(ReferenceChain(chain.id, "".join(letters), torch.tensor(np.array(ca), dtype=torch.float64),
                                         torch.tensor(present)))
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
# Relaxation (optional: OpenMM + PDBFixer)
# ----------------------------------------------------------------------------------------------------------

# Ideal trans peptide (Engh & Huber): CA-C 1.525, C-N 1.329, N-CA 1.458, C=O 1.231 Å; CA-C-N 116.2°,
# C-N-CA 121.7°, CA-C-O 120.8°. In the peptide's frame (x from CA(i) to CA(i+1), y in the plane, towards O's
# side negative) the CA-CA distance comes out 3.80 Å.
_CA_C, _C_N, _N_CA, _C_O = 1.525, 1.329, 1.458, 1.231
_ANGLE_CA_C_N, _ANGLE_C_N_CA, _ANGLE_CA_C_O, _ANGLE_N_CA_C = (math.radians(a) for a in (116.2, 121.7, 120.8, 111.2))
# The peptide plane's rotation about CA(i)->CA(i+1), as a function of the virtual torsion tau of
# CA(i-1..i+2): O points at (tau + 180°) / 2 - 10° from the bisector of the neighbours (fitted by eye on seven
# of the PDB chains of choose_handedness; N, C, O come back within 0.25, 0.35, 1.1 Å RMSD of the real backbone).
_PLANE_OFFSET = math.radians(-10.0)
_EXTENDED_TAU = math.radians(-170.0)  # tau assumed at the chain ends (extended)


def _ideal_peptide() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, y) of C(i), O(i) relative to CA(i) and N(i+1) relative to CA(i+1), in the peptide frame."""
    c = np.array([_CA_C, 0.0])
    n = c + _C_N * np.array([-math.cos(_ANGLE_CA_C_N), math.sin(_ANGLE_CA_C_N)])
    back = (c - n) / _C_N
    turn = np.array([[math.cos(_ANGLE_C_N_CA), -math.sin(_ANGLE_C_N_CA)],
                     [math.sin(_ANGLE_C_N_CA), math.cos(_ANGLE_C_N_CA)]])
    ca_next = n + _N_CA * (turn @ back)  # trans: CA(i+1) on the other side of C-N from CA(i)
    o = c + _C_O * np.array([-math.cos(_ANGLE_CA_C_O), -math.sin(_ANGLE_CA_C_O)])
    x = ca_next / np.linalg.norm(ca_next)
    frame = np.stack([x, np.array([-x[1], x[0]])], axis=1)  # columns: x, y
    return c @ frame, o @ frame, n @ frame, ca_next @ frame


def _rotate(v: torch.Tensor, axis: torch.Tensor, angle) -> torch.Tensor:
    """Rodrigues: rotate ``v`` (..., 3) about unit ``axis`` (..., 3) by ``angle`` (...)."""
    angle = torch.as_tensor(angle, dtype=v.dtype).expand(v.shape[:-1]).unsqueeze(-1)
    return v * angle.cos() + torch.linalg.cross(axis, v, dim=-1) * angle.sin() \
        + axis * (axis * v).sum(-1, keepdim=True) * (1 - angle.cos())


def rebuild_backbone(ca) -> torch.Tensor:
    """Approximate N, CA, C, O from a Cα trace: (n, 3) -> (n, 4, 3), float64.

    Each peptide CA(i), C(i), O(i), N(i+1), CA(i+1) is placed as an ideal trans unit along CA(i)->CA(i+1)
    (C and O from CA(i), N from CA(i+1), so a CA-CA distance off 3.8 Å strains only the C-N bond), its
    plane turned about that axis by the virtual torsion (see ``_PLANE_OFFSET``). The first N and the last C/O
    come from NeRF with ideal angles and extended torsions. Meant as a start for minimisation, not a model.
    """
    ca = torch.as_tensor(ca, dtype=torch.float64)
    n = ca.shape[0]
    if ca.dim() != 2 or ca.shape[1] != 3 or n < 2:
        raise ValueError(f"ca must be (n >= 2, 3), got {tuple(ca.shape)}")
    c_local, o_local, n_local, ca_next_local = (torch.tensor(v, dtype=torch.float64) for v in _ideal_peptide())
    x = torch.nn.functional.normalize(ca[1:] - ca[:-1], dim=-1)  # [n-1, 3] peptide axes
    before = torch.full_like(x, float("nan"))
    after = torch.full_like(x, float("nan"))
    before[1:] = ca[:-2] - ca[1:-1]  # CA(i-1) - CA(i)
    after[:-1] = ca[2:] - ca[1:-1]  # CA(i+2) - CA(i+1)
    if n == 2:
        helper = torch.tensor([1.0, 0, 0] if abs(float(x[0, 0])) < 0.9 else [0, 1.0, 0], dtype=torch.float64)
        before[0] = torch.linalg.cross(x[0], helper)
    before = before - (before * x).sum(-1, keepdim=True) * x
    after = after - (after * x).sum(-1, keepdim=True) * x
    # Chain ends: a virtual neighbour at the extended torsion.
    if torch.isnan(before[0]).any():
        before[0] = _rotate(after[0], x[0], -_EXTENDED_TAU)
    if torch.isnan(after[-1]).any():
        after[-1] = _rotate(before[-1], x[-1], _EXTENDED_TAU)
    u = torch.nn.functional.normalize(before, dim=-1)
    v = torch.nn.functional.normalize(after, dim=-1)
    tau = utils.get_dihedral_torch(ca[:-1] + u, ca[:-1], ca[1:], ca[1:] + v)  # [n-1]
    e1 = torch.nn.functional.normalize(u + v, dim=-1)
    e2 = torch.linalg.cross(x, e1, dim=-1)
    phi = (tau + math.pi) / 2 + _PLANE_OFFSET
    o_side = phi.cos()[:, None] * e1 + phi.sin()[:, None] * e2  # direction of C=O off the axis
    y = -o_side if float(o_local[1] - c_local[1]) < 0 else o_side

    def place(origin, local):
        return origin + local[0] * x + local[1] * y

    backbone = torch.zeros(n, 4, 3, dtype=torch.float64)
    backbone[:, 1] = ca
    backbone[:-1, 2] = place(ca[:-1], c_local)
    backbone[:-1, 3] = place(ca[:-1], o_local)
    backbone[1:, 0] = place(ca[1:], n_local - ca_next_local)
    # First N: psi(0) = N(0)-CA(0)-C(0)-N(1) of an extended strand; last C: phi = C(n-2)-N-CA-C, last O.
    # nerf_torch's theta (the seed's convention) is the supplement of the bond angle.
    backbone[0, 0] = utils.nerf_torch(backbone[1, 0], backbone[0, 2], ca[0], _N_CA, math.pi - _ANGLE_N_CA_C,
                                      math.radians(130))
    backbone[-1, 2] = utils.nerf_torch(backbone[-2, 2], backbone[-1, 0], ca[-1], _CA_C, math.pi - _ANGLE_N_CA_C,
                                       math.radians(-120))
    backbone[-1, 3] = utils.nerf_torch(backbone[-1, 0], ca[-1], backbone[-1, 2], _C_O, math.pi - _ANGLE_CA_C_O,
                                       math.radians(-50))
    return backbone


RELAX_INSTALL_HINT = "relax needs OpenMM and PDBFixer: pip install 'af2_ext[relax]' (or conda-forge openmm pdbfixer)"


def _relax_modules():
    try:
        import openmm
        from openmm import app, unit
        from pdbfixer import PDBFixer
    except ImportError as error:
        raise ImportError(f"{RELAX_INSTALL_HINT} ({error})") from error
    return openmm, app, unit, PDBFixer


def relax_available() -> bool:
    """Whether :func:`relax_structure` can run (OpenMM and PDBFixer importable)."""
    try:
        _relax_modules()
    except ImportError:
        return False
    return True


def relax_structure(pdb_in: PathLike, pdb_out: PathLike, *, restraint: float = 10.0, max_iterations: int = 0,
                    platform: Optional[str] = None) -> dict:
    """Amber (amber14) minimisation of a predicted chain, heavy atoms and hydrogens added by PDBFixer.

    A Cα-only input (some residue without N or C) first gets its backbone from :func:`rebuild_backbone`; then
    PDBFixer adds side chains, the terminal OXT and hydrogens (pH 7); then OpenMM minimises in vacuum
    (no cutoff, H-bond constraints) with harmonic restraints on the Cα positions, the only predicted atoms
    (AlphaFold's relax restrains all its heavy atoms, with the same default 10 kcal/mol/Å²).

    Args:
        pdb_in: PDB of one chain (the first chain is used) of the 20 standard residues.
        pdb_out: the relaxed all-atom PDB (written atomically).
        restraint: Cα restraint constant in kcal/mol/Å².
        max_iterations: minimiser iterations (0: until converged).
        platform: OpenMM platform name ("CPU", "CUDA", ...); None lets OpenMM choose.

    Returns:
        dict: atoms, rebuilt_backbone, energy_before / energy_after (kJ/mol, after adding atoms and after
        minimising), ca_shift (Cα RMSD to the input, Å).

    Raises:
        ImportError: OpenMM or PDBFixer missing (install ``af2_ext[relax]``).
    """
    openmm, app, unit, PDBFixer = _relax_modules()
    from Bio.PDB import PDBParser

    pdb_in = os.fspath(pdb_in)
    if not os.path.isfile(pdb_in):
        raise FileNotFoundError(f"structure {pdb_in!r} does not exist")
    chain = next(iter(PDBParser(QUIET=True).get_structure("in", pdb_in)[0]))
    residues = [r for r in chain if r.id[0] == " "]
    sequence = "".join(utils.THREE_TO_ONE_LETTER_MAP.get(r.get_resname(), "X") for r in residues)
    if "X" in sequence or len(residues) < 2:
        raise ValueError(f"relax needs a chain of at least 2 of the 20 standard residues; {pdb_in!r} has "
                         f"{len(residues)} residues: {sequence!r} (X = not standard)")
    if any("CA" not in r for r in residues):
        raise ValueError(f"relax needs a Cα on every residue of {pdb_in!r}")
    ca = torch.tensor(np.array([r["CA"].coord for r in residues]), dtype=torch.float64)
    rebuilt = any(not all(atom in r for atom in ("N", "C")) for r in residues)
    if rebuilt:
        backbone = rebuild_backbone(ca).numpy()
        atoms = [dict(zip(utils.BACKBONE_ATOM_NAMES, residue)) for residue in backbone]
    else:
        atoms = [{a.get_id(): a.coord for a in r if a.element != "H"} for r in residues]

    fixer = PDBFixer(pdbfile=io.StringIO(_pdb_text(sequence, atoms)))
    fixer.findMissingResidues()
    fixer.missingResidues = {}  # complete the residues there are; never model new ones
    fixer.findMissingAtoms()
    fixer.addMissingAtoms()
    fixer.addMissingHydrogens(7.0)

    forcefield = app.ForceField("amber14-all.xml")
    system = forcefield.createSystem(fixer.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    restraint_force = openmm.CustomExternalForce("0.5 * k * ((x - x0)^2 + (y - y0)^2 + (z - z0)^2)")
    restraint_force.addGlobalParameter("k", restraint * 4.184 * 100.0)  # kcal/mol/Å² -> kJ/mol/nm²
    for name in ("x0", "y0", "z0"):
        restraint_force.addPerParticleParameter(name)
    positions = fixer.positions
    ca_atoms = [atom.index for atom in fixer.topology.atoms() if atom.name == "CA"]
    for index in ca_atoms:
        restraint_force.addParticle(index, positions[index].value_in_unit(unit.nanometer))
    system.addForce(restraint_force)

    integrator = openmm.VerletIntegrator(0.001 * unit.picoseconds)
    if platform is None:
        simulation = app.Simulation(fixer.topology, system, integrator)
    else:
        simulation = app.Simulation(fixer.topology, system, integrator, openmm.Platform.getPlatformByName(platform))
    simulation.context.setPositions(positions)

    def energy() -> float:
        state = simulation.context.getState(getEnergy=True)
        return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    energy_before = energy()
    simulation.minimizeEnergy(maxIterations=max_iterations)
    energy_after = energy()
    if not math.isfinite(energy_after):
        raise FloatingPointError(f"relax of {pdb_in!r}: the minimised energy is not finite")
    final = simulation.context.getState(getPositions=True).getPositions()
    with atomic_open(pdb_out) as handle:
        app.PDBFile.writeFile(fixer.topology, final, handle, keepIds=True)
    moved = np.array([final[i].value_in_unit(unit.angstrom) for i in ca_atoms])
    start = np.array([positions[i].value_in_unit(unit.angstrom) for i in ca_atoms])
    return {"atoms": system.getNumParticles(), "rebuilt_backbone": rebuilt, "energy_before": energy_before,
            "energy_after": energy_after, "ca_shift": float(np.sqrt(((moved - start) ** 2).sum(-1).mean()))}


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
        records.append((str(name), _check_letters(sequence, f"sequence {name!r}")))
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
    from af2_ext.checkpoint import load_model

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
        _relax_modules()  # fail before folding
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
            "seed": seed, "msa_rows": None if msa is None else int(min(msa.shape[0], MAX_MSA_ROWS)),
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


__all__ = [
    "UNKNOWN_TOKEN", "GAP_TOKEN", "FoldResult", "FoldOutput", "ReferenceChain", "tokenize", "read_fasta", "read_msa",
    "fold_sequence", "choose_handedness", "write_ca_trace", "write_structure", "plot_distogram", "plot_contacts", "read_reference",
    "true_distances", "compare_to_reference", "rebuild_backbone", "relax_available", "relax_structure",
    "fold_from_checkpoint", "add_fold_arguments", "run_fold",
]
