#!/usr/bin/env python3
"""Build the plugin ZIP that QGIS's "Install from ZIP" accepts: ``dist/srmf-<version>.zip``.

The archive holds one folder, ``srmf/`` (the plugin's name in QGIS): metadata.txt, __init__.py,
srmf_qgis/ (the QGIS side), core/ (the engine, run in its own process), resources/ (icons, the
concept vocabulary, the embedded default model), requirements.txt (what "Install dependencies…"
installs), README.md and the licence. No tests, benchmarks, caches or virtual environments.

Usage: ``python3 scripts/package.py [--output DIR]`` (stdlib only). Prints the ZIP's path.
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "srmf"
FILES = ["metadata.txt", "__init__.py", "requirements.txt", "README.md", "LICENSE", "LICENSE.md", "LICENSE.txt"]
FOLDERS = ["srmf_qgis", "core", "resources"]
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".git", ".venv"}
SKIP_SUFFIXES = {".pyc", ".pyo", ".partial", ".tmp"}
REQUIRED = ["metadata.txt", "__init__.py", "srmf_qgis/plugin.py", "core/cli.py", "resources/models/default.srmf",
            "requirements.txt"]


def version() -> str:
    for line in (ROOT / "metadata.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("version="):
            return line.split("=", 1)[1].strip()
    raise SystemExit("metadata.txt has no version=")


def members():
    for name in FILES:
        p = ROOT / name
        if p.is_file():
            yield p
    for folder in FOLDERS:
        for p in sorted((ROOT / folder).rglob("*")):
            rel = p.relative_to(ROOT)
            if any(part in SKIP_DIRS for part in rel.parts) or p.suffix in SKIP_SUFFIXES or ".partial" in p.name:
                continue
            if p.is_file() and not p.name.startswith(".srmf-write-test"):
                yield p


def build(output: Path) -> Path:
    missing = [r for r in REQUIRED if not (ROOT / r).is_file()]
    if missing:
        raise SystemExit(f"Cannot package: missing {', '.join(missing)} (run `make default-model` for the model)")
    output.mkdir(parents=True, exist_ok=True)
    target = output / f"{PLUGIN}-{version()}.zip"
    tmp = target.with_suffix(".zip.partial")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for p in members():
            arc = f"{PLUGIN}/{p.relative_to(ROOT).as_posix()}"
            info = zipfile.ZipInfo.from_file(p, arc)
            info.external_attr = (0o644 & 0xFFFF) << 16
            info.compress_type = zipfile.ZIP_STORED if p.suffix == ".srmf" else zipfile.ZIP_DEFLATED
            with open(p, "rb") as fh:
                zf.writestr(info, fh.read())
    tmp.replace(target)
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(ROOT / "dist"), help="folder of the ZIP (default: dist/)")
    args = ap.parse_args(argv)
    target = build(Path(args.output).absolute())
    with zipfile.ZipFile(target) as zf:
        n = len(zf.namelist())
    print(f"{target} ({target.stat().st_size / 1e6:.1f} MB, {n} files): QGIS \u25b8 Plugins \u25b8 Manage and "
          "Install Plugins \u25b8 Install from ZIP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
