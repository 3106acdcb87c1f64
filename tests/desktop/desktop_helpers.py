"""The pytest side of the desktop tier: start the real QGIS application on a virtual X display with
a throw-away profile that links this checkout as the plugin ``srmf``, and read back what it showed
(the canvas PNG and its world file, mapped onto the class raster's pixels)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
DRIVER = Path(__file__).resolve().parent / "driver.py"
GREY = (0x80, 0x80, 0x80)  # what paletted_renderer draws for a class without a colour


class QgisRunError(AssertionError):
    pass


def make_profile(root: Path) -> Path:
    """``root/profiles/default`` with the checkout linked as plugin ``srmf`` and enabled (as after
    ``make deploy`` and ticking SRMF in the Plugin Manager). Returns the ``--profiles-path``."""
    profile = root / "profiles" / "default"
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    link = plugins / "srmf"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    ini = profile / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    # No prompts that would stop an unattended run: no CRS dialog for the Dubai tile (no georeferencing),
    # no "save the temporary scratch layers?" on exit (the Processing dialog's class-area table).
    ini.write_text("[PythonPlugins]\nsrmf=true\n\n"
                   "[app]\nprojections\\unknownCrsBehavior=NoAction\naskToSaveMemoryLayers=false\n\n"
                   "[qgis]\ncheckVersion=false\nshowTips=false\n", encoding="utf-8")
    return root


def qgis_env(home: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("QT_QPA_PLATFORM", None)  # the Makefile's "offscreen" would hide the real application
    env.pop("PYTHONPATH", None)        # QGIS finds the plugin in the profile, not on the path
    env["HOME"] = str(home)
    env["XDG_RUNTIME_DIR"] = str(home / "runtime")
    # The engine's interpreter (torch; QGIS's own Python has none): the Makefile's, else this checkout's .venv.
    env["SRMF_PYTHON"] = os.environ.get("SRMF_PYTHON") or str(VENV_PYTHON)
    env["LC_ALL"] = env.get("LC_ALL") or "C.UTF-8"
    (home / "runtime").mkdir(parents=True, exist_ok=True, mode=0o700)
    return env


def run_qgis(config: dict, config_path: Path, profiles: Path, home: Path, log: Path, timeout: float,
             project: Optional[str] = None) -> dict:
    """``xvfb-run -a qgis --code driver.py`` (and ``--project``); returns the driver's report.

    The process group is killed after ``timeout`` s; a hung, crashed or silent QGIS raises
    QgisRunError with the end of its log and whatever report it wrote."""
    config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    env = qgis_env(home)
    env["SRMF_DESKTOP_CONFIG"] = str(config_path)
    cmd = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", "qgis", "--noversioncheck", "--nologo",
           "--profiles-path", str(profiles), "--code", str(DRIVER)]
    if project:
        cmd += ["--project", project]
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(home),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait(timeout=30)
    seconds = time.monotonic() - t0
    # What outlived QGIS: xvfb-run, Xvfb or qgis (its process group), or an engine worker (its own
    # session, recognised by the configuration path in its environment). Ended by their ids.
    def outliving():
        return sorted(set(_group_members(proc.pid)) | set(_processes_with_env("SRMF_DESKTOP_CONFIG", str(config_path))))

    deadline = time.monotonic() + 10  # Xvfb may take a moment to go after xvfb-run has returned
    while outliving() and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = [f"{pid}: {_cmdline(pid)}" for pid in outliving()]
    for pid in outliving():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    report_file = Path(config["out"]) / f"report_{config['mode']}.json"
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.exists() else None
    tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
    if hung:
        raise QgisRunError(f"QGIS ({config['mode']}) hung: killed after {timeout:.0f} s. Report so far: "
                           f"{json.dumps(report)[:3000] if report else 'none'}\n--- QGIS log ---\n{tail}")
    if report is None:
        raise QgisRunError(f"QGIS ({config['mode']}) exited with {rc} after {seconds:.0f} s without a report "
                           f"(the driver did not run?)\n--- QGIS log ---\n{tail}")
    report["_rc"] = rc
    report["_wall_s"] = round(seconds, 1)
    report["_leftover_processes"] = leftovers
    report["_log_tail"] = tail
    return report


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return "?"


def _processes_with_env(name: str, value: str) -> List[int]:
    """PIDs of live processes whose environment has ``name=value`` (Linux /proc; others' are unreadable)."""
    marker = f"{name}={value}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker in (d / "environ").read_bytes().split(b"\0"):
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    out.append(int(d.name))
        except OSError:
            continue
    return out


def _group_members(pgid: int) -> List[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d.name))
    return out


# -- the model's classes -------------------------------------------------------------------------------
def model_classes(path) -> List[dict]:
    """``[{id, name, colour}]`` from a .srmf model header (the reference the screen is checked against)."""
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from srmf_qgis.modelheader import read_header

    return [{"id": int(c["id"]), "name": str(c["name"]), "colour": str(c["colour"]).upper()}
            for c in read_header(path)["classes"]]


def rgb(colour: str):
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


# -- the canvas against the class raster -----------------------------------------------------------------
def read_png(path) -> np.ndarray:
    from osgeo import gdal

    ds = gdal.Open(str(path))
    assert ds is not None, f"cannot read the screenshot {path}"
    arr = np.stack([ds.GetRasterBand(i + 1).ReadAsArray() for i in range(min(3, ds.RasterCount))], axis=-1)
    ds = None
    return arr.astype(np.int16)


def read_classes(path) -> np.ndarray:
    from osgeo import gdal

    ds = gdal.Open(str(path))
    assert ds is not None, f"cannot read the class raster {path}"
    arr = ds.GetRasterBand(1).ReadAsArray()
    ds = None
    return arr


def read_world_file(path):
    """(A, D, B, E, C, F): x = C + A·col, y = F + E·row at pixel centres (no rotation)."""
    vals = [float(v) for v in Path(path).read_text().split()]
    assert len(vals) == 6, f"bad world file {path}: {vals}"
    return vals


def _uniform(cls: np.ndarray, r: int) -> np.ndarray:
    """True where the (2r+1)² neighbourhood of a pixel holds one class only (away from class edges)."""
    from scipy import ndimage

    size = 2 * r + 1
    hi = ndimage.maximum_filter(cls, size=size, mode="nearest")
    lo = ndimage.minimum_filter(cls, size=size, mode="nearest")
    return hi == lo


def compare_canvas(shot: dict, class_raster, classes: List[dict], tol: int = 3) -> dict:
    """Map every canvas pixel onto the class raster and compare its colour with the class colour.

    Only canvas pixels whose class is the same all around (no class edge within the footprint of a
    canvas pixel plus one raster pixel) are compared. Returns per class: pixels compared and pixels
    in the class colour; ``grey_share``: the share of the layer's canvas pixels that are #808080."""
    img = read_png(shot["png"])
    A, D, B, E, C, F = read_world_file(shot["world_file"])
    assert D == 0 and B == 0, "rotated canvas"
    cls = read_classes(class_raster)
    lw, lh = shot["layer_size"]
    assert cls.shape == (lh, lw), f"class raster {cls.shape} vs layer {lh}x{lw}"
    x0, y0, x1, y1 = shot["layer_extent"]
    h, w = img.shape[:2]
    cols = np.arange(w)
    rows = np.arange(h)
    xs = C + A * cols
    ys = F + E * rows
    px = np.floor((xs - x0) / (x1 - x0) * lw).astype(np.int64)
    py = np.floor((y1 - ys) / (y1 - y0) * lh).astype(np.int64)
    inx = (px >= 0) & (px < lw)
    iny = (py >= 0) & (py < lh)
    raster_per_canvas = abs(A) / ((x1 - x0) / lw)
    r = int(math.ceil(raster_per_canvas)) + 1
    uniform = _uniform(cls, r)
    sub_rows, sub_cols = np.nonzero(iny)[0], np.nonzero(inx)[0]
    grid_py, grid_px = np.meshgrid(py[sub_rows], px[sub_cols], indexing="ij")
    values = cls[grid_py, grid_px]
    ok_mask = uniform[grid_py, grid_px]
    pixels = img[np.ix_(sub_rows, sub_cols)]
    layer_px = values != 255
    grey = np.all(np.abs(pixels - np.array(GREY)) <= tol, axis=-1) & layer_px
    out = {"compared": {}, "matching": {}, "canvas_px_on_layer": int(layer_px.sum()),
           "grey_share": float(grey.sum() / max(1, layer_px.sum())), "raster_px_per_canvas_px": raster_per_canvas,
           "class_share": {}}
    for c in classes:
        cid = int(c["id"])
        sel = (values == cid) & ok_mask
        n = int(sel.sum())
        out["class_share"][c["name"]] = float((values == cid).sum() / max(1, layer_px.sum()))
        if n == 0:
            continue
        want = np.array(rgb(c["colour"]))
        match = np.all(np.abs(pixels[sel] - want) <= tol, axis=-1)
        out["compared"][c["name"]] = n
        out["matching"][c["name"]] = int(match.sum())
    return out


def copy_artifacts(names, src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        if (src / n).exists():
            shutil.copy(src / n, dst / n)
