"""The protein vocabulary, atom layouts and distance bins: one place, used by every reader, writer and model input.

Tokens (the model's vocabulary, ``NUM_TOKENS = 21``): the 20 amino acids in ``RESTYPES`` order are 0..19; token 20
(``UNKNOWN_TOKEN``) is everything else the model sees: an unknown or ambiguous letter (``UNKNOWN_LETTERS``), an
MSA gap and padding. sidechainnet's own vocabulary has one more id, 21 for "unknown" (``SCN_UNKNOWN_TOKEN``), which
the seed's mask helpers (``af2_ext.utils.scn_cloud_mask``) accept; the model never receives it.

Atom layouts: the seed's (sidechainnet 0.x) has ``SEED_ATOMS_PER_RESIDUE = 14`` slots per residue, N, CA, C, O,
then the side chain in ``SIDECHAIN_ATOM_NAMES`` order; sidechainnet 1.0's has ``SCN_ATOMS_PER_RESIDUE = 15``,
N, CA, C, O, OXT, then the side chain (its ``build_info.ATOM_MAP_HEAVY``).

Distances: ``DISTOGRAM_BUCKETS = 37`` classes over ``DISTANCE_THRESHOLDS = linspace(2, 20, 37)`` Å (the seed's).
"""
from __future__ import annotations

import torch

RESTYPES = "ACDEFGHIKLMNPQRSTVWY"
RESTYPE_ORDER = {letter: index for index, letter in enumerate(RESTYPES)}
NUM_TOKENS = 21
UNKNOWN_TOKEN = 20  # unknown residue, MSA gap and padding: the model's only token beyond the 20 amino acids
GAP_TOKEN = UNKNOWN_TOKEN
PAD_TOKEN = UNKNOWN_TOKEN
SCN_UNKNOWN_TOKEN = 21  # sidechainnet's "unknown" id: accepted by the seed's mask helpers, never a model input
UNKNOWN_LETTERS = "XBZJUO"  # X and the IUPAC ambiguity / rare codes, all read as unknown
GAP_LETTER = "-"

ONE_TO_THREE = {
    "A": "ALA", "C": "CYS", "D": "ASP", "E": "GLU", "F": "PHE", "G": "GLY", "H": "HIS", "I": "ILE", "K": "LYS",
    "L": "LEU", "M": "MET", "N": "ASN", "P": "PRO", "Q": "GLN", "R": "ARG", "S": "SER", "T": "THR", "V": "VAL",
    "W": "TRP", "Y": "TYR",
}
THREE_TO_ONE = {three: one for one, three in ONE_TO_THREE.items()}

# Molecular-dynamics names of standard residues (CHARMM, AMBER protonation states), read as their residue (as
# sidechainnet's measure.ALLOWED_NONSTD_RESIDUES does).
FORCE_FIELD_RESIDUES = {"HSD": "HIS", "HSE": "HIS", "HSP": "HIS", "HID": "HIS", "HIE": "HIS", "HIP": "HIS",
                        "CYX": "CYS", "CYM": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS"}
# Amino-acid residue names with no parent among the 20, read as X (unknown): the PDB's unknown residue,
# selenocysteine and pyrrolysine (whose one-letter codes U and O the model reads as unknown too).
UNKNOWN_RESIDUE_NAMES = ("UNK", "SEC", "PYL")

SEED_ATOMS_PER_RESIDUE = 14
SCN_ATOMS_PER_RESIDUE = 15
COORD_PAD_VALUE = 0  # the coordinate of an absent atom slot (sidechainnet's GLOBAL_PAD_CHAR)
BACKBONE_ATOM_NAMES = ("N", "CA", "C", "O")
# Heavy side-chain atoms in sidechainnet's order (slots 4.. of the seed's 14, 5.. of sidechainnet 1.0's 15).
SIDECHAIN_ATOM_NAMES = {
    "ALA": ("CB",),
    "ARG": ("CB", "CG", "CD", "NE", "CZ", "NH1", "NH2"),
    "ASN": ("CB", "CG", "OD1", "ND2"),
    "ASP": ("CB", "CG", "OD1", "OD2"),
    "CYS": ("CB", "SG"),
    "GLN": ("CB", "CG", "CD", "OE1", "NE2"),
    "GLU": ("CB", "CG", "CD", "OE1", "OE2"),
    "GLY": (),
    "HIS": ("CB", "CG", "ND1", "CE1", "NE2", "CD2"),
    "ILE": ("CB", "CG1", "CD1", "CG2"),
    "LEU": ("CB", "CG", "CD1", "CD2"),
    "LYS": ("CB", "CG", "CD", "CE", "NZ"),
    "MET": ("CB", "CG", "SD", "CE"),
    "PHE": ("CB", "CG", "CD1", "CE1", "CZ", "CE2", "CD2"),
    "PRO": ("CB", "CG", "CD"),
    "SER": ("CB", "OG"),
    "THR": ("CB", "OG1", "CG2"),
    "TRP": ("CB", "CG", "CD1", "NE1", "CE2", "CZ2", "CH2", "CZ3", "CE3", "CD2"),
    "TYR": ("CB", "CG", "CD1", "CE1", "CZ", "OH", "CE2", "CD2"),
    "VAL": ("CB", "CG1", "CG2"),
}

# sidechainnet's values for placing the carbonyl oxygen.
BACKBONE_BUILD_INFO = {
    "BONDLENS": {"n-ca": 1.442, "ca-c": 1.498, "c-n": 1.379, "c-o": 1.229},
    "BONDANGS": {"ca-c-o": 2.0944},
}

DISTOGRAM_BUCKETS = 37
DISTANCE_THRESHOLDS = torch.linspace(2, 20, steps=DISTOGRAM_BUCKETS)
CONTACT_THRESHOLD = 8.0  # Å: a residue pair closer than this is in contact (CASP's definition)
MAX_NUM_MSA = 20  # MSA rows the model embeds (its row-position table)
