"""pytest configuration shared by python_tests/."""
from __future__ import annotations

import os
import sys

import pytest
import torch


def _inductor_cache_dir() -> str:
    """An inductor cache of this build's own: torch's compiled-graph cache keys do not cover a custom op's fake
    kernel or compiled code, so a cache warmed by another build of af2_ext (another checkout, an older commit)
    can replay graphs that assume its output strides. Keyed by the compiled extension and ops.py."""
    import glob
    import hashlib
    import importlib.util
    import tempfile

    package = os.path.dirname(importlib.util.find_spec("af2_ext").origin)
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(package, "_C*.so"))) + [os.path.join(package, "ops.py")]:
        with open(path, "rb") as f:
            digest.update(f.read())
    return os.path.join(tempfile.gettempdir(), f"af2_ext_inductor_{digest.hexdigest()[:16]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())

# What asks the CUDA driver: none of it may run while tests are imported and collected (a CUDA case asks when it
# runs, in helpers.require_device), so collection behaves the same on any machine and never initialises CUDA.
# Only our own code is watched (the caller's file under the checkout's af2_ext/ or python_tests/): a CUDA build of
# torch may ask CUDA inside its own lazy imports, which is not ours to fail.
_OURS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
              for d in ("af2_ext", "python_tests"))
_CUDA_QUERIES = ("is_available", "device_count", "current_device", "get_device_properties", "get_device_name",
                 "get_device_capability", "init", "mem_get_info")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes several seconds (torch.compile, subprocesses); "
                                       "deselect with -m 'not slow'")


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session):
    """Fails the collection if any test module or parametrisation queries CUDA."""
    calls = []
    saved = {name: getattr(torch.cuda, name) for name in _CUDA_QUERIES}

    def spy(name):
        def query(*args, **kwargs):
            if os.path.abspath(sys._getframe(1).f_code.co_filename).startswith(_OURS):
                calls.append(name)
            return saved[name](*args, **kwargs)
        return query

    for name in _CUDA_QUERIES:
        setattr(torch.cuda, name, spy(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)
    if calls:
        raise pytest.UsageError(f"torch.cuda.{calls[0]}() was called while collecting the tests ({len(calls)} CUDA "
                                "queries in all): ask CUDA in the test body (helpers.require_device), not at import "
                                "or in a parametrisation")
