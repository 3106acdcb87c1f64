"""The runtime boundary (DESIGN.md): core/ never imports qgis or Qt; srmf_qgis/ never imports torch."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT, engine_env

QT_ROOTS = {"qgis", "PyQt5", "PyQt6", "PySide2", "PySide6", "sip"}
TORCH_ROOTS = {"torch", "torchvision", "timm", "segmentation_models_pytorch", "open_clip", "sentence_transformers"}


def _imported_roots(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0], node.lineno


def _offenders(folder: Path, banned: set):
    found = []
    for py in sorted(folder.rglob("*.py")):
        for root, line in _imported_roots(py):
            if root in banned:
                found.append(f"{py.relative_to(ROOT)}:{line} imports {root}")
    return found


def test_core_never_imports_qgis_or_qt():
    files = list((ROOT / "core").rglob("*.py"))
    assert len(files) >= 8  # the guard really looks at the engine
    assert _offenders(ROOT / "core", QT_ROOTS) == []


def test_srmf_qgis_never_imports_torch():
    folder = ROOT / "srmf_qgis"
    if folder.is_dir():
        assert _offenders(folder, TORCH_ROOTS) == []
    # the guard itself catches a violation
    assert _imported_roots_sample() == [("torch", 1), ("qgis", 2)]


def _imported_roots_sample():
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write("import torch.nn\nfrom qgis.core import QgsProject\nfrom . import x\n")
    try:
        return list(_imported_roots(Path(fh.name)))
    finally:
        Path(fh.name).unlink()


# -- the layout (issue 10) ----------------------------------------------------------------------------
MAX_FUNCTION_LINES = 80
COMMAND_ROOMS = ("segment", "finetune", "evaluate", "findclass")


def _long_functions(paths, limit=MAX_FUNCTION_LINES):
    long = []
    for py in paths:
        tree = ast.parse(py.read_text(encoding="utf-8"), filename=str(py))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    long.append(f"{py.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return long


def test_no_function_longer_than_80_lines(tmp_path):
    files = sorted((ROOT / "core").rglob("*.py")) + sorted((ROOT / "srmf_qgis").rglob("*.py"))
    assert len(files) > 40
    assert _long_functions(files) == []
    # the guard itself catches a long function
    sample = tmp_path / "long.py"
    sample.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert [s.split()[-3] for s in _long_functions_at(sample)] == ["f"]


def _long_functions_at(path):
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
            found.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


def test_each_room_says_what_it_is_for():
    """Every package of the engine has an __init__.py whose docstring says what the room is for."""
    packages = sorted({p.parent for p in (ROOT / "core").rglob("*.py")})
    assert {p.name for p in packages} >= {"core", "geo", "model", "text", *COMMAND_ROOMS}
    for pkg in packages:
        init = pkg / "__init__.py"
        assert init.is_file(), f"{pkg.relative_to(ROOT)} has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc) > 40, f"{init.relative_to(ROOT)} does not say what the room is for"


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _private_imports(files):
    found = []
    for py in files:
        me = ".".join(py.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("core.")
                    and _room(node.module) != _room(me)):
                found += [f"{py.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    return found


def test_commands_never_use_another_commands_private_parts(tmp_path):
    """A command folder uses the floor, model/ and other rooms' public functions only: no module imports
    a private (_name) of a module outside its own room (a room = a folder of core/, or a floor module)."""
    assert _private_imports(sorted((ROOT / "core").rglob("*.py"))) == []
    # the guard itself catches a violation (a findclass module using a private of the windows floor)
    fake = ROOT / "core" / "findclass" / "_guard_sample.py"
    try:
        fake.write_text("from core.windows import _batched\nfrom core.findclass.params import DEFAULTS\n")
        assert _private_imports([fake]) == ["core/findclass/_guard_sample.py:1 imports core.windows._batched"]
    finally:
        fake.unlink()


def test_help_of_every_command_imports_no_torch():
    """``python -m core info`` and every ``python -m core <command> --help`` stay light (no torch)."""
    import subprocess
    import sys

    from core.cli import COMMANDS

    assert set(COMMANDS) >= {"info", "segment", "finetune", "evaluate", "findclass", "findclass-handoff"}
    code = ("import sys; from core.cli import main; rc = main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    for argv in [["info"], *([c, "--help"] for c in COMMANDS)]:
        out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                             env=engine_env())
        last = out.stdout.strip().splitlines()[-1]
        assert last == "NO-TORCH 0", f"python -m core {' '.join(argv)}: {last}\n{out.stderr[-2000:]}"
    # and the check can fail: the segment job itself does load torch
    out = subprocess.run([sys.executable, "-c", "import sys, core.segment.job; print('torch' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, env=engine_env())
    assert out.stdout.strip() == "True"
