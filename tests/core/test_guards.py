"""The runtime boundary (DESIGN.md): core/ never imports qgis or Qt; srmf_qgis/ never imports torch."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

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
