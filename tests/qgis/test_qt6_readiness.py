"""Qt 6 readiness of the plugin (issue 16, part 2): an AST check of every module of srmf_qgis/ that fails on an
unscoped enum (``Qt.AlignLeft`` instead of ``Qt.AlignmentFlag.AlignLeft``: PyQt6 has only the scoped form),
``exec_``, a direct PyQt5/PyQt6/sip import (everything goes through ``qgis.PyQt``) and ``QVariant.Type``
(gone in Qt 6; ``srmf_qgis.compat.field_type`` is the one place allowed to use it). Enums are recognised by
introspection of the classes each module imports from qgis.*, on the running QGIS. A planted module checks
that the check fails (a test of the test). ``metadata.txt`` does not claim ``supportsQt6``: the plugin has
not run on QGIS 4 here."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "srmf_qgis"
ALLOWED_QT5 = {"compat.py"}


def problems(source: str, name: str = "<module>") -> list:
    """What in ``source`` is not Qt 6 ready, as ``"name:line text"`` strings."""
    tree = ast.parse(source)
    imported = {}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] in ("PyQt5", "PyQt6", "sip") for m in mods):
                out.append(f"{name}:{node.lineno} imports {mods[0]} directly (use qgis.PyQt)")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qgis"):
            try:
                mod = importlib.import_module(node.module)
            except ImportError:
                continue
            for a in node.names:
                if isinstance(getattr(mod, a.name, None), type):
                    imported[a.asname or a.name] = getattr(mod, a.name)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr == "exec_":
            out.append(f"{name}:{node.lineno} exec_ (use exec)")
        if isinstance(node.value, ast.Name) and node.value.id in imported:
            cls = imported[node.value.id]
            if cls.__name__ == "QVariant" and node.attr == "Type" and name not in ALLOWED_QT5:
                out.append(f"{name}:{node.lineno} QVariant.Type (gone in Qt 6: srmf_qgis.compat.field_type)")
            value = getattr(cls, node.attr, None)
            kind = type(value)
            if value is None or isinstance(value, type) or kind.__name__ == node.attr:
                continue
            # the enum's scope on the class: its own name (Qgis.MessageLevel), or an alias of it
            # (QGIS 3.40 moved QgsProcessingParameterNumber.Type to Qgis.ProcessingNumberParameterType)
            scopes = [kind.__name__] if getattr(cls, kind.__name__, None) is kind else \
                [a for a in dir(cls) if a[:1].isupper() and getattr(cls, a, None) is kind]
            if scopes and node.attr not in scopes:
                out.append(f"{name}:{node.lineno} {node.value.id}.{node.attr} is unscoped "
                           f"({node.value.id}.{scopes[0]}.{node.attr})")
    return out


def test_the_plugin_has_no_unscoped_enum_or_qt5_only_name():
    found = [p for f in sorted(ROOT.rglob("*.py")) for p in problems(f.read_text(), f.name)]
    assert found == [], "\n".join(found)


def test_the_check_fails_on_planted_qt5_code():
    planted = (
        "from qgis.PyQt.QtCore import Qt, QVariant\n"
        "from qgis.core import Qgis, QgsProcessingParameterNumber\n"
        "from PyQt5.QtWidgets import QDialog\n"
        "a = Qt.AlignLeft\n"
        "b = Qgis.Warning\n"
        "c = QgsProcessingParameterNumber.Integer\n"
        "d = QVariant.Type.Int\n"
        "QDialog().exec_()\n"
        "ok = (Qt.AlignmentFlag.AlignLeft, Qgis.MessageLevel.Warning, QgsProcessingParameterNumber.Type.Double)\n")
    found = problems(planted, "planted.py")
    assert any("imports PyQt5.QtWidgets directly" in p for p in found)
    assert "planted.py:4 Qt.AlignLeft is unscoped (Qt.AlignmentFlag.AlignLeft)" in found
    assert "planted.py:5 Qgis.Warning is unscoped (Qgis.MessageLevel.Warning)" in found
    assert any(p.startswith("planted.py:6 QgsProcessingParameterNumber.Integer is unscoped") for p in found)
    assert any(p.startswith("planted.py:7 QVariant.Type") for p in found)
    assert any(p.startswith("planted.py:8 exec_") for p in found)
    assert not any(p.startswith("planted.py:9") for p in found)  # the scoped forms pass


def test_metadata_claims_qt6_only_when_it_has_been_run_there():
    meta = (ROOT.parent / "metadata.txt").read_text()
    assert "supportsQt6=True" not in meta
