"""AF2_EXT_CUDA_ARCHS -> TORCH_CUDA_ARCH_LIST for setup.py; pure Python, imports no torch.

Parses exactly as the arch-normalisation block of CMakeLists.txt does, so one value means the same targets in
the extension build and in the nvcc-only CMake build: items separated by ';', ',' or spaces; an optional
'sm_'/'compute_' prefix and '+PTX' suffix are stripped; forms 80, 8.0, 90a, 9.0a, 100a, 10.0f, 120; duplicates
dropped (first spelling kept, order kept); the numerically newest arch (the first listed on a tie) gets PTX.
"""
import re
from dataclasses import dataclass
from typing import Mapping, Optional

VAR = "AF2_EXT_CUDA_ARCHS"
DEFAULT = "80;90"
MIN_ARCH = 80  # mma.sync m16n8k16 with bf16 operands needs sm_80

_SEPARATORS = re.compile(r"[;, ]+")
_PREFIX = re.compile(r"^(sm_|compute_)")
_ARCH = re.compile(r"([0-9]+)\.?([0-9])([af]?)")  # fullmatch; the same regex as in CMakeLists.txt


@dataclass(frozen=True)
class Arch:
    """One parsed target: major.minor plus an optional 'a' (arch-specific) or 'f' (family) suffix."""

    major: int
    minor: int
    suffix: str  # "", "a" or "f"

    @property
    def number(self) -> int:
        return self.major * 10 + self.minor

    def cmake(self) -> str:  # "90a"
        return f"{self.number}{self.suffix}"

    def torch(self) -> str:  # "9.0a"
        return f"{self.major}.{self.minor}{self.suffix}"


def parse_archs(value: str) -> list[Arch]:
    """'sm_80, 9.0a;90a+PTX' -> [Arch(8, 0, ''), Arch(9, 0, 'a')].

    ValueError naming AF2_EXT_CUDA_ARCHS and the item for an unparsable or pre-sm_80 arch or an empty list.
    """
    archs = []
    for item in _SEPARATORS.split(value):
        if not item:
            continue
        stripped = _PREFIX.sub("", item).removesuffix("+PTX")
        m = _ARCH.fullmatch(stripped)
        if m is None:
            raise ValueError(f"{VAR}: cannot parse CUDA arch {item!r} (expected forms like 80, 8.0, 90a, 9.0a, "
                             f"100a, 10.0f, sm_90) in {value!r}")
        arch = Arch(int(m.group(1)), int(m.group(2)), m.group(3))
        if arch.number < MIN_ARCH:
            raise ValueError(f"{VAR}: CUDA arch {item!r} is below sm_{MIN_ARCH}; the af2_ext kernels need "
                             f"sm_{MIN_ARCH} or newer (mma.sync m16n8k16 bf16)")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError(f"{VAR} is empty ({value!r}); give CUDA archs like '80;90'")
    return archs


def newest(archs: list[Arch]) -> Arch:
    """The numerically newest arch; the first listed wins a tie (as in CMakeLists.txt)."""
    best = archs[0]
    for arch in archs[1:]:
        if arch.number > best.number:
            best = arch
    return best


def torch_arch_list(value: str) -> str:
    """'80;90' -> '8.0;9.0+PTX', 'sm_90a' -> '9.0a+PTX' (TORCH_CUDA_ARCH_LIST form, '+PTX' on the newest).

    torch.utils.cpp_extension accepts the 'a' forms (9.0a, 10.0a, 12.0a, ...) with or without '+PTX'. PTX of
    an 'a' arch JITs only on that same arch (as with CMake's "90a"), so for PTX that newer GPUs can run, make
    the newest arch a plain one. torch has no family ('f') forms, so those are refused here.
    """
    archs = parse_archs(value)
    for arch in archs:
        if arch.suffix == "f":
            raise ValueError(f"{VAR}: CUDA arch {arch.torch()!r} is family-specific, which torch's extension "
                             f"build (TORCH_CUDA_ARCH_LIST) does not accept; use {arch.number} or "
                             f"{arch.number}a (the CMake build accepts {arch.cmake()})")
    top = newest(archs)
    return ";".join(a.torch() + ("+PTX" if a is top else "") for a in archs)


def resolve_arch_list(environ: Mapping[str, str]) -> tuple[str, Optional[str]]:
    """The TORCH_CUDA_ARCH_LIST the extension build should use, and a one-line note or None.

    AF2_EXT_CUDA_ARCHS wins when set (non-empty, as CMakeLists.txt treats it); the note says so when an inherited
    TORCH_CUDA_ARCH_LIST differs. Otherwise a non-empty inherited TORCH_CUDA_ARCH_LIST is used as is; otherwise
    the default "80;90".
    """
    ours = environ.get(VAR, "")
    inherited = environ.get("TORCH_CUDA_ARCH_LIST", "")
    if ours:
        value = torch_arch_list(ours)
        note = None
        if inherited and inherited != value:
            note = (f"af2_ext: {VAR}={ours!r} wins over the inherited TORCH_CUDA_ARCH_LIST={inherited!r}; "
                    f"building for {value!r}")
        return value, note
    if inherited:
        return inherited, None
    return torch_arch_list(DEFAULT), None
