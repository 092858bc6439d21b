"""Files in and out. Atomic writes: everything af2_ext saves (checkpoints, datasets, PDB files, figures, JSON,
logs) goes through a temporary file in the target's directory and one rename, so a crash never leaves half a
file and an existing file survives a failed write. Checks of the paths a user names, before anything is read or
written, with errors that name the path."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename (a reader never
    sees a half-written file, and an existing file survives a failure). Permissions follow the umask."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs) -> Iterator[Any]:
    """``open`` for writing through :func:`atomic_path`; flushed and fsynced before the rename."""
    with atomic_path(path, os.path.splitext(os.fspath(path))[1]) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: PathLike, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    with atomic_open(path, "w") as out:
        json.dump(data, out, indent=2, allow_nan=False)
        out.write("\n")


def save_figure_atomic(fig, path: PathLike) -> None:
    """Save a matplotlib figure to ``path`` (format from the extension, PNG by default) atomically."""
    suffix = os.path.splitext(os.fspath(path))[1]
    with atomic_path(path, suffix) as tmp:
        fig.savefig(tmp, dpi=120, format=suffix.lstrip(".") or "png")


def check_input_file(path: PathLike, kind: str) -> str:
    """``path`` as a str when it names something to read; FileNotFoundError when nothing is there and ValueError
    for a directory, both naming it as ``kind`` ("checkpoint", "FASTA file", ...)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{kind} {path!r} is a directory, not a file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{kind} {path!r} does not exist")
    return path


def check_output_dir(path: PathLike, kind: str = "output directory") -> str:
    """``path`` as a str when it is a writable directory or could be created as one; a ValueError naming it
    otherwise (a file in the way, a file among its parents, no permission). Creates nothing."""
    path = os.fspath(path)
    existing = os.path.abspath(path)
    if os.path.exists(existing) and not os.path.isdir(existing):
        raise ValueError(f"{kind} {path!r} exists and is not a directory")
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{kind} {path!r} cannot be created: {existing!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{kind} {path!r} cannot be written: no permission to write in {existing!r}")
    return path
