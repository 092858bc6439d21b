"""Two rooms, one door: the kernel library never imports the protein application (af2_ext.app) nor its packages.

- In a fresh interpreter where the application's packages cannot be imported (as after ``pip install af2_ext``
  without the ``app`` extra), every library module imports, asks for none of them and leaves af2_ext.app unloaded.
- No module outside ``af2_ext/app`` has an import of ``af2_ext.app`` (``af2_ext/__main__.py``, the
  ``python -m af2_ext`` door, imports it only when run as a program).
- ``af2-ext`` without the application's packages says how to install them and exits 2.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import af2_ext

PACKAGE_DIR = os.path.dirname(os.path.abspath(af2_ext.__file__))
ROOT = os.path.dirname(PACKAGE_DIR)
# The "app" and "relax" extras (pyproject.toml) and what they pull in.
APP_PACKAGES = ("tqdm", "Bio", "matplotlib", "sidechainnet", "openmm", "pdbfixer", "mdtraj", "prody")
NOT_LIBRARY = ("af2_ext.app", "af2_ext.bench", "af2_ext.__main__")  # bench: a tool beside the library, own deps

# Runs in a fresh interpreter: refuses the application's packages, records who asked for them, imports the library.
BLOCKED_RUN = textwrap.dedent('''
    import importlib, json, os, pkgutil, sys, traceback

    BLOCKED, PACKAGE_DIR, NOT_LIBRARY = json.loads(sys.argv[1])
    asked = []

    class RefuseApplicationPackages:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] not in BLOCKED:
                return None
            callers = [f.filename for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
            if callers and os.path.abspath(callers[-1]).startswith(PACKAGE_DIR + os.sep):
                asked.append(f"{name} (from {callers[-1]})")  # torch's own optional imports do not count
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

    sys.meta_path.insert(0, RefuseApplicationPackages())

    import af2_ext, af2_ext.ops, af2_ext.model, af2_ext.utils, af2_ext.layouts, af2_ext.reversible, af2_ext.blocks
    import af2_ext.reference

    def library_modules(package):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if info.name in NOT_LIBRARY:
                continue
            module = importlib.import_module(info.name)
            yield info.name
            if info.ispkg:
                yield from library_modules(module)

    imported = list(library_modules(af2_ext))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m == "af2_ext.app"
                    or m.startswith("af2_ext.app."))
    print(json.dumps({"imported": imported, "asked": asked, "loaded": loaded,
                      "alphafold2": af2_ext.Alphafold2.__module__}))
''')


def _blocked_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")


def test_library_imports_without_the_application():
    import json

    config = json.dumps([APP_PACKAGES, PACKAGE_DIR, NOT_LIBRARY])
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, config], capture_output=True, text=True,
                          env=_blocked_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, f"the library failed to import without the application's packages:\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"af2_ext.ops", "af2_ext.model", "af2_ext.utils", "af2_ext.layouts", "af2_ext.reversible",
                "af2_ext.blocks", "af2_ext.reference", "af2_ext.residue_constants"}
    assert expected <= set(result["imported"]), result["imported"]
    assert not any(name.startswith(NOT_LIBRARY) for name in result["imported"]), result["imported"]
    assert result["asked"] == [], f"library modules asked for application packages: {result['asked']}"
    assert result["loaded"] == [], f"importing the library loaded {result['loaded']}"


def _is_application(name: str) -> bool:
    return name == "af2_ext.app" or name.startswith("af2_ext.app.")


def _imported_modules(tree: ast.AST, module: str) -> list:
    """Absolute names of everything ``module``'s source imports (``from . import x`` resolved, and string
    constants handed to ``importlib.import_module``)."""
    package = module.rsplit(".", 1)[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names += [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            names.append(str(node.args[0].value))
    return names


def test_no_library_module_imports_the_application():
    offenders = []
    checked = 0
    for directory, subdirs, files in os.walk(PACKAGE_DIR):
        subdirs[:] = [d for d in subdirs if d != "__pycache__"]
        relative = os.path.relpath(directory, ROOT)
        if relative.split(os.sep)[:2] == ["af2_ext", "app"]:
            continue
        for name in files:
            if not name.endswith(".py") or (relative == "af2_ext" and name == "__main__.py"):
                continue
            path = os.path.join(directory, name)
            module = ".".join(relative.split(os.sep) + ([] if name == "__init__.py" else [name[:-3]]))
            if name == "__init__.py":
                module += ".__init__"  # so that relative imports resolve against the package itself
            with open(path, encoding="utf-8") as handle:
                tree = ast.parse(handle.read(), path)
            checked += 1
            offenders += [f"{os.path.relpath(path, ROOT)}: {imported}" for imported in _imported_modules(tree, module)
                          if _is_application(imported)]
    assert checked >= 10, f"found only {checked} library modules under {PACKAGE_DIR}"
    assert offenders == [], f"library modules import the application: {offenders}"


def test_the_static_check_finds_application_imports():
    cases = {"import af2_ext.app.fold": "af2_ext.utils", "from af2_ext.app import data": "af2_ext.utils",
             "from af2_ext import app": "af2_ext.utils", "from .app import fold": "af2_ext.utils",
             "from . import app": "af2_ext.utils", "importlib.import_module('af2_ext.app.cli')": "af2_ext.utils",
             "from ..app import cli": "af2_ext.bench.x"}
    for source, module in cases.items():
        imported = _imported_modules(ast.parse(source), module)
        assert any(_is_application(name) for name in imported), (source, imported)
    for source in ("from af2_ext import apply", "import af2_ext.applications", "from af2_ext import utils"):
        assert not any(_is_application(n) for n in _imported_modules(ast.parse(source), "af2_ext.utils")), source


def test_command_without_the_application_says_how_to_install_it():
    runner = textwrap.dedent('''
        import sys
        for name in ("tqdm", "Bio", "matplotlib"):
            sys.modules[name] = None  # as if not installed: import fails, importlib.util.find_spec gives None
        from af2_ext.app.cli import main
        sys.exit(main(sys.argv[1:]))
    ''')
    for command in ("train", "fold", "demo", "build-dataset"):
        proc = subprocess.run([sys.executable, "-c", runner, command, "--help"], capture_output=True, text=True,
                              env=_blocked_env(), cwd=ROOT, timeout=300)
        assert proc.returncode == 2, (command, proc.returncode, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "af2_ext[app]" in lines[0] and lines[0].startswith(f"af2-ext {command}: error:"), \
            proc.stderr
