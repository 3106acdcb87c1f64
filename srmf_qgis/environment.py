"""The engine's Python environment: "Install dependencies…" (a managed virtual environment) and the
"Diagnostics" report. No torch here: everything about torch is asked of the engine interpreter in a
subprocess."""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from . import runtime

TORCH_VARIANTS = {
    "default": ("Default from PyPI (with CUDA on Linux; CPU-only on Windows and macOS)", []),
    "cpu": ("CPU only (a much smaller download)", ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]),
}


class InstallError(Exception):
    """Installing the engine's dependencies failed; the message says at which step and why."""


def _stream(argv: List[str], log: Callable[[str], None], is_canceled: Callable[[], bool],
            on_line: Optional[Callable[[str], None]] = None) -> int:
    """Run ``argv``, sending each output line to ``log``; stop it when ``is_canceled()``."""
    log("$ " + " ".join(argv))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, encoding="utf-8", errors="replace", bufsize=1, env=_pip_env(),
                            **runtime._popen_group())
    import queue
    import threading

    q: "queue.Queue" = queue.Queue()

    def reader():
        for line in proc.stdout:
            q.put(line.rstrip("\n"))
        q.put(None)

    threading.Thread(target=reader, daemon=True).start()
    while True:
        if is_canceled():
            runtime.terminate_tree(proc, grace=5)
            raise InstallError("Cancelled by the user.")
        try:
            line = q.get(timeout=0.2)
        except Exception:  # queue.Empty
            continue
        if line is None:
            break
        log(line)
        if on_line:
            on_line(line)
    return proc.wait()


def _pip_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # pip must see the venv, not QGIS's own path entries
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def install_engine(log: Callable[[str], None], progress: Callable[[float], None],
                   is_canceled: Callable[[], bool] = lambda: False, *, venv: Optional[Path] = None,
                   requirements: Optional[Path] = None, variant: str = "default", base_python: Optional[str] = None,
                   upgrade_pip: bool = True, extra_pip_args: Optional[List[str]] = None,
                   verify_modules=runtime.ENGINE_MODULES) -> str:
    """Create the managed virtual environment (``--system-site-packages`` from QGIS's Python, so it
    sees QGIS's GDAL and NumPy) and pip-install the engine's requirements into it.

    Returns:
        The environment's Python executable (it is then used automatically, see runtime.resolve_python).

    Raises:
        InstallError: naming the step that failed and what to do.
    """
    venv = Path(venv or runtime.managed_venv_dir())
    requirements = Path(requirements or runtime.REQUIREMENTS)
    base = base_python or runtime.qgis_python()
    if not base:
        raise InstallError("Could not find QGIS's Python executable to create the environment from. Create a "
                           "virtual environment yourself and choose its Python in the SRMF settings.")
    if not requirements.is_file():
        raise InstallError(f"The list of the engine's packages is missing: {requirements}")
    py = runtime.venv_python(venv)
    progress(2.0)
    if not py.is_file():
        log(f"Creating the virtual environment {venv} from {base} (it sees QGIS's own packages: GDAL, NumPy) ...")
        venv.parent.mkdir(parents=True, exist_ok=True)
        code = _stream([base, "-m", "venv", "--system-site-packages", str(venv)], log, is_canceled)
        if code != 0 or not py.is_file():
            hint = (" On Debian/Ubuntu install the package python3-venv (sudo apt install python3-venv)."
                    if sys.platform.startswith("linux") else "")
            raise InstallError(f"Could not create the virtual environment {venv} (exit code {code}).{hint}")
    else:
        log(f"Using the existing environment {venv}.")
    progress(10.0)
    if upgrade_pip:
        _stream([str(py), "-m", "pip", "install", "--upgrade", "pip>=23"], log, is_canceled)
    progress(15.0)
    wanted = [l for l in requirements.read_text(encoding="utf-8").splitlines() if l.strip() and not l.startswith("#")]
    seen = {"n": 0}

    def on_line(line: str):
        if line.startswith("Collecting ") or line.startswith("Requirement already satisfied"):
            seen["n"] += 1
            progress(15.0 + 60.0 * min(1.0, seen["n"] / max(1, 3 * len(wanted))))
        elif line.startswith("Installing collected packages"):
            progress(80.0)
        elif line.startswith("Successfully installed"):
            progress(95.0)

    argv = [str(py), "-m", "pip", "install", "--progress-bar", "off", "-r", str(requirements)]
    argv += TORCH_VARIANTS.get(variant, TORCH_VARIANTS["default"])[1] + list(extra_pip_args or [])
    log(f"Installing the engine's packages ({len(wanted)} requirements; PyTorch alone is a download of "
        "several hundred MB to a few GB) ...")
    code = _stream(argv, log, is_canceled, on_line)
    if code != 0:
        raise InstallError(f"pip could not install the engine's packages (exit code {code}); the log above says "
                           "which package failed. Check the internet connection (or a proxy: set HTTPS_PROXY) and try "
                           "again.")
    progress(97.0)
    missing = runtime.missing_modules(str(py), tuple(verify_modules), refresh=True)
    if missing:
        raise InstallError(f"The environment still lacks: {', '.join(missing)}.")
    log(f"Done: the SRMF engine will run with {py}.")
    progress(100.0)
    return str(py)


# -- diagnostics ---------------------------------------------------------------------------------

def diagnostics(probe: bool = True) -> dict:
    """Everything a bug report needs: QGIS, Python, the engine interpreter, torch, CUDA, GPUs, GDAL."""
    info = {"plugin_version": _plugin_version(), "plugin_folder": str(runtime.PLUGIN_DIR),
            "os": platform.platform(), "qgis_python": sys.version.split()[0], "qgis_python_executable":
            runtime.qgis_python(), "managed_environment": str(runtime.managed_venv_dir()),
            "default_model": str(runtime.DEFAULT_MODEL) if runtime.DEFAULT_MODEL.is_file() else None}
    try:
        from qgis.core import Qgis
        from qgis.PyQt.QtCore import QT_VERSION_STR

        info["qgis"] = Qgis.QGIS_VERSION
        info["qt"] = QT_VERSION_STR
    except ImportError:  # pragma: no cover
        info["qgis"] = None
    try:
        from osgeo import gdal

        info["qgis_gdal"] = gdal.__version__
    except ImportError:  # pragma: no cover
        info["qgis_gdal"] = None
    try:
        interp = runtime.resolve_python(require_torch=True)
        info["engine_python"] = interp.path
        info["engine_python_source"] = interp.source
    except runtime.EngineError as exc:
        info["engine_python"] = None
        info["engine_python_error"] = str(exc)
    if probe and info.get("engine_python"):
        t0 = time.perf_counter()
        info["engine"] = runtime.probe_engine(info["engine_python"])
        info["engine_probe_seconds"] = round(time.perf_counter() - t0, 2)
    return info


def _plugin_version() -> str:
    from . import __version__

    return __version__


def diagnostics_text(info: dict) -> str:
    """The diagnostics as plain text, to copy into a bug report."""
    eng = info.get("engine") or {}
    lines = ["SRMF for QGIS \u2014 diagnostics", "",
             f"Plugin:            {info.get('plugin_version')} ({info.get('plugin_folder')})",
             f"QGIS:              {info.get('qgis')} (Qt {info.get('qt')})",
             f"Operating system:  {info.get('os')}",
             f"QGIS's Python:     {info.get('qgis_python')} ({info.get('qgis_python_executable') or 'executable not found'})",
             f"QGIS's GDAL:       {info.get('qgis_gdal')}",
             f"Default model:     {info.get('default_model') or 'MISSING (run make default-model or reinstall)'}",
             f"Managed env:       {info.get('managed_environment')}"]
    if info.get("engine_python"):
        lines.append(f"Engine Python:     {info['engine_python']} (from {info.get('engine_python_source')})")
    else:
        lines.append(f"Engine Python:     NOT FOUND \u2014 {info.get('engine_python_error')}")
    if eng:
        if eng.get("error"):
            lines.append(f"Engine check:      FAILED \u2014 {eng['error']}")
        else:
            def row(label, value):
                lines.append(f"  {label + ':':<30s} {value}")

            row("Python", f"{eng.get('python_version')} ({eng.get('python')})")
            row("PyTorch", eng.get("torch") or "NOT INSTALLED " + str(eng.get("torch_error", "")))
            row("PyTorch built for CUDA", eng.get("torch_cuda_build"))
            row("CUDA available", eng.get("cuda_available"))
            gpus = eng.get("gpus") or []
            for g in gpus:
                row(f"GPU {g['index']}", f"{g['name']} ({g['memory_gb']} GB, compute capability {g['capability']})")
            if not gpus:
                row("GPUs", "none found (the engine runs on the CPU)")
            if eng.get("mps_available"):
                row("Apple MPS", "available")
            row("CPU threads", eng.get("threads"))
            for k in ("gdal", "numpy", "safetensors", "timm", "segmentation_models_pytorch", "open_clip",
                      "sentence_transformers"):
                row(k, eng.get(k) or "not installed")
            row("Platform", eng.get("platform"))
    return "\n".join(lines)


def torch_variant_names():
    return {k: v[0] for k, v in TORCH_VARIANTS.items()}


def looks_like_python(path: str) -> bool:
    return bool(re.search(r"python[\d.]*(\.exe)?$", os.path.basename(path or ""), re.I))
