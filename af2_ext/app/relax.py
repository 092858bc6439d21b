"""Relaxation of a predicted Cα trace (optional: the ``relax`` extra, OpenMM + PDBFixer): the backbone rebuilt from
the Cα trace (:func:`rebuild_backbone`), side chains and hydrogens added, Amber-minimised with Cα restraints
(:func:`relax_structure`).
"""
from __future__ import annotations

import io
import math
import os
from typing import Optional

import numpy as np
import torch

from af2_ext import utils
from af2_ext.app.structure import pdb_text, read_structure
from af2_ext.fileio import PathLike, atomic_open
from af2_ext.residue_constants import BACKBONE_ATOM_NAMES

__all__ = ["RELAX_INSTALL_HINT", "rebuild_backbone", "relax_available", "relax_structure"]

# Ideal trans peptide (Engh & Huber): CA-C 1.525, C-N 1.329, N-CA 1.458, C=O 1.231 Å; CA-C-N 116.2°,
# C-N-CA 121.7°, CA-C-O 120.8°. In the peptide's frame (x from CA(i) to CA(i+1), y in the plane, towards O's
# side negative) the CA-CA distance comes out 3.80 Å.
_CA_C, _C_N, _N_CA, _C_O = 1.525, 1.329, 1.458, 1.231
_ANGLE_CA_C_N, _ANGLE_C_N_CA, _ANGLE_CA_C_O, _ANGLE_N_CA_C = (math.radians(a) for a in (116.2, 121.7, 120.8, 111.2))
# The peptide plane's rotation about CA(i)->CA(i+1), as a function of the virtual torsion tau of
# CA(i-1..i+2): O points at (tau + 180°) / 2 - 10° from the bisector of the neighbours (fitted by eye on seven
# of the PDB chains of fold.choose_handedness; N, C, O come back within 0.25, 0.35, 1.1 Å RMSD of the real backbone).
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


def relax_modules():
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
        relax_modules()
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
    openmm, app, unit, PDBFixer = relax_modules()
    pdb_in = os.fspath(pdb_in)
    if not os.path.isfile(pdb_in):
        raise FileNotFoundError(f"structure {pdb_in!r} does not exist")
    chains = read_structure(pdb_in).chains
    if not chains:
        raise ValueError(f"relax needs a protein chain; {pdb_in!r} has none")
    residues = chains[0].observed
    sequence = "".join("X" if r.modified else r.letter for r in residues)
    if "X" in sequence or len(residues) < 2:
        raise ValueError(f"relax needs a chain of at least 2 of the 20 standard residues; {pdb_in!r} has "
                         f"{len(residues)} residues: {sequence!r} (X = not standard)")
    if any("CA" not in r.atoms for r in residues):
        raise ValueError(f"relax needs a Cα on every residue of {pdb_in!r}")
    ca = torch.tensor(np.array([r.atoms["CA"] for r in residues]), dtype=torch.float64)
    rebuilt = any(not all(atom in r.atoms for atom in ("N", "C")) for r in residues)
    if rebuilt:
        backbone = rebuild_backbone(ca).numpy()
        atoms = [dict(zip(BACKBONE_ATOM_NAMES, residue)) for residue in backbone]
    else:
        atoms = [r.atoms for r in residues]

    fixer = PDBFixer(pdbfile=io.StringIO(pdb_text(sequence, atoms)))
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
