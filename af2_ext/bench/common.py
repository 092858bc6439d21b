"""Pieces every ``python -m af2_ext.bench`` subcommand shares: timing, peak memory, the environment record,
progress, the text table and the atomic JSON write."""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from af2_ext.fileio import atomic_path, save_figure_atomic, write_json_atomic  # noqa: F401  re-exported

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, reps: int,
            budget_s: float = float("inf")) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls.

    CPU: ``time.perf_counter`` around each call. CUDA: a pair of CUDA events on the current stream per call.
    At most ``reps`` timed calls, fewer (but at least 3, or ``reps`` if smaller) once ``budget_s`` seconds of
    timed calls have passed, so that slow configurations of a large grid stay bounded.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    spent = 0.0
    for _ in range(max(reps, 1)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t0) * 1e3
        times.append(elapsed)
        spent += elapsed / 1e3
        if spent > budget_s and len(times) >= min(3, reps):
            break
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------


def cuda_peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak CUDA memory allocated by one call of ``fn()`` above what was allocated before it, in MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process; Linux >= 4.0 only."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def child_peak_rss_mib(fn: Callable[[], object], warmup: Callable[[], object]) -> dict:
    """Peak resident memory that one ``fn()`` adds, measured inside a fresh child process.

    Where Linux lets us reset the high-water mark, ``warmup()`` runs first (compilation, lazy init) and the
    peak is VmHWM - VmRSS around ``fn()``; ``process_peak_mib`` is the whole process's high-water mark
    during ``fn()`` (interpreter, torch and the inputs included). Elsewhere ``warmup`` is skipped and the increase of
    ``ru_maxrss`` is used, which a compile step would swamp. The parent starts the child with a fixed glibc
    mmap threshold (see :func:`run_child`) so freed tensors go back to the OS instead of being reused unseen.
    """
    warmup()
    if _reset_peak_rss():
        before = _proc_status_kib("VmRSS")
        fn()
        peak = _proc_status_kib("VmHWM")
        if before is not None and peak is not None:
            return {"peak_mib": max(peak - before, 0) / 1024, "process_peak_mib": peak / 1024,
                    "method": "VmHWM - VmRSS after warmup"}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": max(after - before, 0) / 1024, "process_peak_mib": after / 1024,
            "method": "ru_maxrss increase (includes warmup)"}


def run_child(code: str, payload: dict, *, threads: int, timeout_s: float = 600.0) -> dict:
    """Run ``code`` in a fresh Python that reads ``payload`` as JSON on stdin and prints one JSON line last."""
    env = dict(os.environ)
    # A fixed threshold turns off glibc's dynamic one: every large tensor is its own mmap, unmapped on free.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(payload), capture_output=True,
                          text=True, env=env, timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory child exited with {proc.returncode}: {tail}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict:
    """What a reader needs to reproduce or compare a run."""
    from af2_ext import __version__, ops

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "af2_ext": __version__,
        "git_commit": _git_commit(),
        "extension_available": ops.extension_available(),
        "cpu_isa": ops.cpu_isa(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": cpu_model(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "af2_ext.bench"] + sys.argv[1:]),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def progress(items: Sequence, describe: Callable[[object], str]) -> Iterator:
    """Iterate ``items`` with a progress bar on stderr: tqdm where installed, one plain line per item else."""
    try:
        from tqdm import tqdm
    except ImportError:
        for i, item in enumerate(items):
            print(f"[{i + 1}/{len(items)}] {describe(item)}", file=sys.stderr, flush=True)
            yield item
        return
    bar = tqdm(items, file=sys.stderr, dynamic_ncols=True)
    for item in bar:
        bar.set_description(describe(item))
        yield item


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Right-aligned plain-text table."""
    rows = [list(map(str, row)) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def note_lines(records: Sequence[dict]) -> list[str]:
    """Each distinct (implementation, note) of ``records[i]["results"]`` once, with how many rows had it."""
    seen: dict = {}
    for r in records:
        for impl, res in r["results"].items():
            for note in res["notes"]:
                seen[(impl, note)] = seen.get((impl, note), 0) + 1
    return [f"note: {impl} {note} ({count} of {len(records)} rows)" for (impl, note), count in seen.items()]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def say_plot(path: str, written: bool) -> None:
    """Reports a --plot: where it went, or why there is none."""
    if written:
        print(f"wrote {path}")
    else:
        print("--plot: matplotlib is not installed (pip install matplotlib); no plot written", file=sys.stderr)


def format_targets(title: str, targets: Sequence[dict], *, width: int = 45, value_spec: str = ".3f") -> str:
    """The targets block of a report: ``title``, then one line per target dict (name, value, status, and
    optionally threshold_text, baseline, note)."""
    lines = [title]
    for t in targets:
        value = "-" if t["value"] is None else format(t["value"], value_spec)
        line = f"  {t['name']:<{width}} {value:>7}  "
        if t.get("threshold_text"):
            line += f"({t['threshold_text']})  "
        line += t["status"]
        if t.get("baseline"):
            line += f"  (vs {t['baseline']})"
        if t.get("note"):
            line += f"  [{t['note']}]"
        lines.append(line)
    return "\n".join(lines)


def fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def reason(error: BaseException) -> str:
    """One line naming an error, for the notes of a skipped measurement."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".strip()
    return text if len(text) <= 240 else text[:237] + "..."
