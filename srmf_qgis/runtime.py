"""The runtime boundary: run the SRMF engine (``python -m core <command> ... --json``) in its own process.

QGIS never imports torch (DESIGN.md, "The runtime boundary"). Every job is a subprocess of the engine
interpreter with the plugin folder on ``PYTHONPATH``; its JSON lines on standard output are relayed
to a ``QgsProcessingFeedback`` (or anything with the same methods):

    {"type": "progress", "percent": 42.0, "message": "segmenting"}   -> setProgress / setProgressText
    {"type": "log", "level": "info"|"warning"|"error", "message": ..} -> pushInfo / pushWarning / reportError
    {"type": "metrics", "iteration": i, "miou": f, "per_class_iou": {..}} -> pushInfo (+ on_metrics)
    {"type": "result", ...}                                          -> the return value
    {"type": "error", "message": .., "exit_code": ..}                -> EngineError(message)

On ``feedback.isCanceled()`` the worker and its children (it runs in its own process group/session)
get SIGTERM; the engine removes its partial outputs and exits with 130. A worker that does not stop
within ``TERMINATE_GRACE_S`` is killed, and the partial files it left are removed here.

Which interpreter runs the engine (first that applies):

1. the QGIS setting ``srmf/python`` (Settings dialog of the plugin);
2. the environment variable ``SRMF_PYTHON``;
3. the managed virtual environment made by "Install dependencies…" (:func:`managed_venv_dir`);
4. a ``.venv`` inside the plugin folder (a developer checkout linked with ``make deploy``);
5. QGIS's own Python, when it already has the engine's dependencies (torch, ...).

This module imports no torch, and Qt/QGIS only lazily (it also runs outside QGIS).
"""
from __future__ import annotations

import glob
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

PLUGIN_DIR = Path(__file__).resolve().parent.parent
REQUIREMENTS = PLUGIN_DIR / "requirements.txt"
DEFAULT_MODEL = PLUGIN_DIR / "resources" / "models" / "default.srmf"

SETTINGS_PYTHON = "srmf/python"
SETTINGS_LAST_MODEL = "srmf/last_model"
SETTINGS_DEVICE = "srmf/device"
SETTINGS_TORCH_VARIANT = "srmf/torch_variant"

# Modules the engine imports (checked without importing them: importlib.util.find_spec).
ENGINE_MODULES = ("torch", "numpy", "safetensors", "timm", "segmentation_models_pytorch", "osgeo")
TERMINATE_GRACE_S = 15.0
HOW_TO_INSTALL = ("Open Raster \u25b8 SRMF \u25b8 Settings\u2026 and click \u201cInstall dependencies\u2026\u201d, or choose there "
                  "a Python interpreter that has PyTorch (or set the environment variable SRMF_PYTHON).")


class EngineError(Exception):
    """The engine failed; ``str(exc)`` is a message for the user (it names the file or parameter).

    Attributes: exit_code (the worker's exit status, None if it never ran), stderr (its last lines).
    """

    def __init__(self, message: str, exit_code: Optional[int] = None, stderr: str = ""):
        super().__init__(message)
        self.exit_code = exit_code
        self.stderr = stderr


class EngineCancelled(EngineError):
    """The job was cancelled; the worker is gone and its partial outputs are removed."""


class EngineNotConfigured(EngineError):
    """No Python interpreter with the engine's dependencies was found."""


# -- settings ------------------------------------------------------------------------------------

def get_setting(key: str, default=None):
    """A QgsSettings value, or ``default`` outside QGIS."""
    try:
        from qgis.core import QgsSettings
    except ImportError:  # pragma: no cover - outside QGIS
        return default
    value = QgsSettings().value(key, default)
    return default if value is None else value


def set_setting(key: str, value) -> None:
    from qgis.core import QgsSettings

    QgsSettings().setValue(key, value)


# -- interpreters ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interpreter:
    """A Python interpreter for the engine and where the choice came from (for messages)."""

    path: str
    source: str

    def __str__(self) -> str:
        return f"{self.path} ({self.source})"


def srmf_home() -> Path:
    """Where the plugin keeps its managed environment: ``$SRMF_HOME``, else the user's data folder."""
    if os.environ.get("SRMF_HOME"):
        return Path(os.environ["SRMF_HOME"])
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "srmf"


def managed_venv_dir() -> Path:
    """The managed virtual environment (one per Python version: a venv is tied to its base Python)."""
    return srmf_home() / f"venv-py{sys.version_info.major}{sys.version_info.minor}"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def qgis_python() -> Optional[str]:
    """The executable of the Python that QGIS embeds (inside QGIS ``sys.executable`` is often QGIS)."""
    exe = sys.executable or ""
    if os.path.basename(exe).lower().startswith("python") and os.path.isfile(exe):
        return exe
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates: List[str] = []
    for prefix in dict.fromkeys([sys.exec_prefix, sys.base_exec_prefix, sys.prefix]):
        if os.name == "nt":
            candidates += [os.path.join(prefix, "python.exe"), os.path.join(prefix, "python3.exe")]
        else:
            candidates += [os.path.join(prefix, "bin", f"python{ver}"), os.path.join(prefix, "bin", "python3")]
    import shutil

    candidates += [shutil.which(f"python{ver}") or "", shutil.which("python3") or ""]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


_MISSING_CACHE: Dict[str, List[str]] = {}


def missing_modules(python: str, modules: Sequence[str] = ENGINE_MODULES, refresh: bool = False) -> List[str]:
    """The engine modules ``python`` cannot find (a quick check that imports none of them)."""
    key = f"{python}|{','.join(modules)}"
    if key in _MISSING_CACHE and not refresh:
        return _MISSING_CACHE[key]
    code = ("import importlib.util as u, json, sys; "
            f"print(json.dumps([m for m in {list(modules)!r} if u.find_spec(m) is None]))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                             env=engine_env(python), stdin=subprocess.DEVNULL, **_no_window())
        missing = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else list(modules)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        missing = list(modules)
    _MISSING_CACHE[key] = missing
    return missing


def resolve_python(require_torch: bool = True) -> Interpreter:
    """The interpreter that runs the engine (see the module docstring for the order).

    Args:
        require_torch: False for commands that need no torch (``info``): QGIS's own Python then does.

    Raises:
        EngineNotConfigured: the configured interpreter does not exist, or none was found.
    """
    configured = str(get_setting(SETTINGS_PYTHON, "") or "").strip()
    if configured:
        if not os.path.isfile(configured):
            raise EngineNotConfigured(f"The Python interpreter set in the SRMF settings does not exist: {configured}. "
                                      + HOW_TO_INSTALL)
        return Interpreter(configured, "SRMF settings")
    env = os.environ.get("SRMF_PYTHON", "").strip()
    if env:
        if not os.path.isfile(env):
            raise EngineNotConfigured(f"SRMF_PYTHON names a Python interpreter that does not exist: {env}. " + HOW_TO_INSTALL)
        return Interpreter(env, "SRMF_PYTHON")
    managed = venv_python(managed_venv_dir())
    if managed.is_file():
        return Interpreter(str(managed), "managed environment")
    dev = venv_python(PLUGIN_DIR / ".venv")
    if dev.is_file():
        return Interpreter(str(dev), "the plugin folder's .venv")
    qp = qgis_python()
    if qp and (not require_torch or not missing_modules(qp)):
        return Interpreter(qp, "QGIS's Python")
    raise EngineNotConfigured("SRMF needs a Python interpreter with PyTorch to run its engine, and none is set up. "
                              + HOW_TO_INSTALL)


def _same_file(a: Optional[str], b: Optional[str]) -> bool:
    try:
        return bool(a and b) and os.path.samefile(a, b)
    except OSError:
        return False


def engine_env(python: Optional[str] = None) -> Dict[str, str]:
    """The worker's environment: the plugin folder first on PYTHONPATH, unbuffered UTF-8 output.

    QGIS's own PYTHONHOME/PYTHONPATH (set by some installers, e.g. OSGeo4W) are kept for QGIS's Python
    and the managed environment made from it, and dropped for any other interpreter (a conda Python,
    say), which they would break.
    """
    env = dict(os.environ)
    own = (python is None or _same_file(python, qgis_python())
           or str(Path(python).absolute()).startswith(str(managed_venv_dir().absolute())))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] if own else []
    if not own:
        env.pop("PYTHONHOME", None)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(PLUGIN_DIR)] + paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _no_window() -> dict:
    """Popen options that keep a console window from flashing up on Windows."""
    if os.name == "nt":
        return {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {}


def _popen_group() -> dict:
    """Popen options that start the worker in its own process group/session (to end its children)."""
    if os.name == "nt":
        return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {"start_new_session": True}


def terminate_tree(proc: subprocess.Popen, grace: float = TERMINATE_GRACE_S) -> None:
    """Ask the worker and its children to stop (SIGTERM to its group), kill them after ``grace`` s."""
    if proc.poll() is not None:
        _kill_group_leftovers(proc.pid)
        return
    if os.name == "nt":  # pragma: no cover - Windows
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True, **_no_window())
    else:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        if os.name != "nt":
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:  # pragma: no cover
            proc.kill()
        proc.wait(timeout=30)
    _kill_group_leftovers(proc.pid)


def _kill_group_leftovers(pgid: int) -> None:
    """Children of the worker that outlived it (same process group) are killed too."""
    if os.name == "nt":  # pragma: no cover
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def remove_partials(outputs: Iterable[str], since: float) -> List[str]:
    """Remove temporary files a killed worker left beside ``outputs`` (``.<stem>.*partial*``).

    Only files modified at or after ``since`` (the job's start, epoch seconds) are touched.
    """
    removed = []
    for out in outputs:
        if not out:
            continue
        p = Path(out)
        for f in glob.glob(str(p.parent / f".{glob.escape(p.stem)}.*")):
            try:
                if ("partial" in f or f.endswith(".tmp")) and os.path.getmtime(f) >= since - 1:
                    os.unlink(f)
                    removed.append(f)
            except OSError:
                pass
    return removed


# -- feedback relay ----------------------------------------------------------------------------

def _push(feedback, method: str, text: str) -> None:
    if feedback is None:
        return
    fn = getattr(feedback, method, None)
    if fn is None and method == "pushWarning":
        feedback.reportError(text, False)
        return
    if fn is not None:
        fn(text)


def format_metrics(msg: dict) -> str:
    """One readable line for a ``metrics`` message of ``finetune`` (training loss, or validation IoU)."""
    it = msg.get("iteration")
    per = msg.get("per_class_iou")
    miou = msg.get("miou")
    if per is None and miou is None:
        parts = [f"Iteration {it}"]
        if isinstance(msg.get("loss"), (int, float)):
            parts.append(f"training loss {msg['loss']:.4f}")
        if isinstance(msg.get("lr"), (int, float)):
            parts.append(f"learning rate {msg['lr']:.2e}")
        return ": ".join(parts[:1]) + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")
    per = per or {}
    parts = ", ".join(f"{k} {v:.3f}" if isinstance(v, (int, float)) else f"{k} n/a" for k, v in per.items())
    head = f"Validation at iteration {it}: mIoU {miou:.3f}" if isinstance(miou, (int, float)) \
        else f"Validation at iteration {it}"
    if isinstance(msg.get("overall_accuracy"), (int, float)):
        head += f", overall accuracy {msg['overall_accuracy']:.3f}"
    return head + (f" ({parts})" if parts else "")


def command_line(argv: Sequence[str]) -> str:
    """The worker's command as one could type it in a shell (for the log)."""
    return f"PYTHONPATH={shlex.quote(str(PLUGIN_DIR))} " + " ".join(shlex.quote(str(a)) for a in argv)


def _explain_crash(python: str, code: Optional[int], stderr_tail: str) -> str:
    m = re.search(r"No module named '([\w.]+)'", stderr_tail)
    if m:
        return (f"The Python interpreter {python} lacks the module '{m.group(1)}' that the SRMF engine needs. "
                + HOW_TO_INSTALL)
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        hint = " (often: not enough memory; try a smaller tile size or batch size)" if name == "SIGKILL" else ""
        return f"The SRMF engine was stopped by signal {name}{hint}." + (f"\n{stderr_tail}" if stderr_tail else "")
    last = stderr_tail.strip().splitlines()[-1] if stderr_tail.strip() else ""
    return (f"The SRMF engine stopped unexpectedly (exit code {code})" + (f": {last}" if last else ".")
            + (f"\n\nEngine output:\n{stderr_tail}" if stderr_tail else ""))


def run_engine(command: str, args: Sequence[str], feedback=None, *, python: Optional[str] = None,
               outputs: Sequence[str] = (), on_metrics: Optional[Callable[[dict], None]] = None,
               require_torch: bool = True, progress_range=(0.0, 100.0), poll_s: float = 0.1,
               grace_s: float = TERMINATE_GRACE_S) -> dict:
    """Run ``python -m core COMMAND ARGS --json`` and relay its messages to ``feedback``.

    Args:
        command: ``segment``, ``finetune``, ``evaluate`` or ``info``. args: its arguments (strings).
        feedback: a ``QgsProcessingFeedback`` (or None); its cancel ends the worker.
        python: the interpreter (default: :func:`resolve_python`).
        outputs: the files the job writes (partial files beside them are removed after a kill).
        on_metrics: called with every ``metrics`` message (fine-tuning); ``feedback.srmf_on_metrics``
            is used when it is not given.
        progress_range: the engine's 0..100 % are mapped onto this range of ``feedback``'s progress.

    Returns:
        The ``result`` message (without ``"type"``).

    Raises:
        EngineCancelled: cancelled through ``feedback``. EngineNotConfigured: no interpreter.
        EngineError: the worker reported an error (its message) or stopped without a result.
    """
    py = python or resolve_python(require_torch=require_torch).path
    argv = [py, "-m", "core", command, *[str(a) for a in args], "--json"]
    if on_metrics is None and feedback is not None:
        on_metrics = getattr(feedback, "srmf_on_metrics", None)
    if feedback is not None and hasattr(feedback, "pushCommandInfo"):
        feedback.pushCommandInfo(command_line(argv))
    started = time.time()
    proc = _start_worker(py, argv)
    if feedback is not None and hasattr(feedback, "srmf_on_start"):
        feedback.srmf_on_start(proc.pid)
    lines, stderr_tail, threads = _read_in_threads(proc)
    relay = _Relay(feedback, on_metrics, progress_range)
    cancelled = _pump(lines, relay, feedback, poll_s)
    if cancelled and relay.result is None:
        terminate_tree(proc, grace_s)
        for t in threads:
            t.join(timeout=5)
        _close(proc)
        remove_partials(outputs, started)
        raise EngineCancelled("Cancelled: the SRMF engine was stopped and its partial outputs removed.",
                              proc.returncode)
    code = _wait_for_exit(proc, threads, relay, grace_s)
    tail = "\n".join(stderr_tail)
    if relay.error is not None:
        exit_code = int(relay.error.get("exit_code", code if code is not None else 1))
        message = str(relay.error.get("message") or relay.error.get("error") or "unknown error")
        if exit_code == 130:
            remove_partials(outputs, started)
            raise EngineCancelled(f"Cancelled: {message}", exit_code, tail)
        if re.search(r"No module named '([\w.]+)'", message):
            message = _explain_crash(py, exit_code, message)
        raise EngineError(message, exit_code, tail)
    if relay.result is None or code not in (0, None):
        remove_partials(outputs, started)
        raise EngineError(_explain_crash(py, code, tail), code, tail)
    return relay.result


def _start_worker(py: str, argv: Sequence[str]) -> subprocess.Popen:
    """Start the engine worker in its own process group, from the plugin folder. Raises EngineNotConfigured."""
    try:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=engine_env(py), cwd=str(PLUGIN_DIR), text=True, encoding="utf-8",
                                errors="replace", bufsize=1, **_popen_group())
    except OSError as exc:
        raise EngineNotConfigured(f"Could not start the SRMF engine with {py}: {exc.strerror or exc}. "
                                  + HOW_TO_INSTALL) from exc


def _read_in_threads(proc: subprocess.Popen):
    """Read the worker's stdout lines into a queue (None at the end) and keep the last 40 stderr lines.

    Returns:
        ``(lines queue, stderr deque, [reader threads])``.
    """
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    stderr_tail: deque = deque(maxlen=40)

    def read_stdout():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def read_stderr():
        for line in proc.stderr:
            stderr_tail.append(line.rstrip("\n"))

    threads = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for t in threads:
        t.start()
    return lines, stderr_tail, threads


def _pump(lines: "queue.Queue[Optional[str]]", relay: "_Relay", feedback, poll_s: float) -> bool:
    """Relay the worker's lines until its stdout ends; True when ``feedback`` was cancelled first."""
    while True:
        if feedback is not None and feedback.isCanceled():
            return True
        try:
            line = lines.get(timeout=poll_s)
        except queue.Empty:
            continue
        if line is None:
            return False
        relay.handle(line)


def _wait_for_exit(proc: subprocess.Popen, threads, relay: "_Relay", grace_s: float):
    """Wait for the worker to exit (at most 120 s once it gave a result or an error); its exit code."""
    try:
        code = proc.wait(timeout=120 if relay.result is not None or relay.error is not None else None)
    except subprocess.TimeoutExpired:  # a result came but the worker hangs on exit: end it
        terminate_tree(proc, grace_s)
        code = proc.returncode
    for t in threads:
        t.join(timeout=5)
    _kill_group_leftovers(proc.pid)
    _close(proc)
    return code


class _Relay:
    """Turns the engine's JSON lines into ``feedback`` calls; keeps the ``result`` and ``error`` messages."""

    def __init__(self, feedback, on_metrics: Optional[Callable[[dict], None]], progress_range):
        self.feedback, self.on_metrics = feedback, on_metrics
        self.lo, self.hi = progress_range
        self.result: Optional[dict] = None
        self.error: Optional[dict] = None
        self.last_text = None

    def handle(self, line: str) -> None:
        feedback = self.feedback
        line = line.strip()
        if not line:
            return
        try:
            msg = json.loads(line)
            kind = msg.get("type") if isinstance(msg, dict) else None
        except ValueError:
            kind, msg = None, line
        if kind == "progress":
            self._progress(msg)
        elif kind == "log":
            level, text = msg.get("level", "info"), str(msg.get("message", ""))
            if level == "warning":
                _push(feedback, "pushWarning", text)
            elif level == "error":
                _push(feedback, "pushDebugInfo" if text.startswith("Traceback") else "reportError", text)
            else:
                _push(feedback, "pushInfo", text)
        elif kind == "metrics":
            _push(feedback, "pushInfo", format_metrics(msg))
            if self.on_metrics is not None:
                self.on_metrics(msg)
        elif kind == "result":
            self.result = {k: v for k, v in msg.items() if k != "type"}
        elif kind == "error":
            self.error = msg
        else:
            _push(feedback, "pushDebugInfo", line if isinstance(msg, str) else json.dumps(msg))

    def _progress(self, msg: dict) -> None:
        feedback = self.feedback
        if feedback is None:
            return
        text = msg.get("message") or ""
        if text and text != self.last_text and hasattr(feedback, "setProgressText"):
            feedback.setProgressText(f"SRMF: {text}")
            self.last_text = text
        feedback.setProgress(self.lo + (self.hi - self.lo) * float(msg.get("percent", 0.0)) / 100.0)


def _close(proc: subprocess.Popen) -> None:
    for stream in (proc.stdout, proc.stderr):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass


# -- diagnostics ---------------------------------------------------------------------------------

# Runs in the engine interpreter (never in QGIS): the versions of what the engine needs, the GPUs.
PROBE_CODE = r'''
import importlib, json, platform, sys
out = {"python": sys.executable, "python_version": sys.version.split()[0], "platform": platform.platform()}
def version(name):
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as exc:
        return None
for name in ("numpy", "safetensors", "timm", "segmentation_models_pytorch", "open_clip", "sentence_transformers"):
    out[name] = version(name)
try:
    from osgeo import gdal
    out["gdal"] = gdal.__version__
except Exception as exc:
    out["gdal"] = None
try:
    t = importlib.import_module("torch")
    out["torch"] = t.__version__
    out["torch_cuda_build"] = t.version.cuda
    out["cuda_available"] = bool(t.cuda.is_available())
    gpus = []
    if out["cuda_available"]:
        for i in range(t.cuda.device_count()):
            p = t.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}"})
    out["gpus"] = gpus
    mps = getattr(getattr(t, "backends", None), "mps", None)
    out["mps_available"] = bool(mps and mps.is_available())
    out["threads"] = t.get_num_threads()
except Exception as exc:
    out["torch"] = None
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
'''


def probe_engine(python: str, timeout: float = 180.0) -> dict:
    """What the engine interpreter has: Python, torch, CUDA, GPUs, GDAL, ... (a dict; ``error`` on failure)."""
    try:
        out = subprocess.run([python, "-c", PROBE_CODE], capture_output=True, text=True, timeout=timeout,
                             env=engine_env(python), stdin=subprocess.DEVNULL, **_no_window())
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"could not run {python}: {exc}"}
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"{python} exited with {out.returncode}: {(out.stderr or out.stdout).strip()[-2000:]}"}
