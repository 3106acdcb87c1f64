"""Progress, log, result and error reporting: a terminal progress bar, or JSON lines.

With ``--json`` every message is one JSON object on its own line of standard output, flushed at once.
This is the protocol the QGIS side reads (DESIGN.md, "The runtime boundary")::

    {"type": "progress", "percent": 42.0, "message": "segmenting"}
    {"type": "log", "level": "info" | "warning" | "error", "message": "..."}
    {"type": "result", ...command-specific fields...}
    {"type": "error", "error": "InputError", "message": "...", "exit_code": 2}

Without ``--json``, progress is a tqdm bar on standard error, logs go to standard error and the result
is printed as readable text on standard output.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional


class Reporter:
    """Sends progress, log lines, the result and errors to the terminal or as JSON lines.

    Args:
        json_mode: emit JSON lines on ``stream`` instead of a progress bar and text.
        stream: where JSON lines and the result text go (default ``sys.stdout``).
        min_interval: seconds between two progress messages in JSON mode (the last one always goes).
    """

    def __init__(self, json_mode: bool = False, stream=None, min_interval: float = 0.25):
        self.json_mode = json_mode
        self.stream = stream if stream is not None else sys.stdout
        self.min_interval = min_interval
        self._last_emit = 0.0
        self._last_percent = -1.0
        self._bar = None

    # -- low level -------------------------------------------------------------------------------
    def _emit(self, obj: dict) -> None:
        self.stream.write(json.dumps(obj, default=_json_default) + "\n")
        self.stream.flush()

    # -- public ----------------------------------------------------------------------------------
    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress; ``fraction`` in [0, 1]."""
        percent = round(max(0.0, min(1.0, fraction)) * 100.0, 1)
        if self.json_mode:
            now = time.monotonic()
            if percent >= 100.0 or (now - self._last_emit >= self.min_interval and percent != self._last_percent):
                self._emit({"type": "progress", "percent": percent, "message": message})
                self._last_emit, self._last_percent = now, percent
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=100.0, unit="%", desc=message or None, file=sys.stderr,
                             bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}% [{elapsed}<{remaining}]",
                             disable=None)
        self._bar.n = percent
        self._bar.refresh()

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def log(self, message: str, level: str = "info") -> None:
        """A log line; ``level`` is "info", "warning" or "error"."""
        if self.json_mode:
            self._emit({"type": "log", "level": level, "message": message})
        else:
            prefix = "" if level == "info" else f"{level.upper()}: "
            if self._bar is not None:
                self._bar.write(prefix + message, file=sys.stderr)
            else:
                print(prefix + message, file=sys.stderr, flush=True)

    def warning(self, message: str) -> None:
        self.log(message, "warning")

    def metrics(self, payload: dict, text: Optional[str] = None) -> None:
        """Training metrics (``{"iteration", "loss", "miou", "per_class_iou", ...}``): a JSON line of
        type "metrics", or ``text`` as a log line on a terminal."""
        if self.json_mode:
            self._emit({"type": "metrics", **payload})
        else:
            self.log(text if text is not None else json.dumps(payload, default=_json_default))

    def result(self, payload: dict, text: Optional[str] = None) -> None:
        """The command's result: a JSON object, or ``text`` (default: pretty JSON) on a terminal."""
        self.close_progress()
        if self.json_mode:
            self._emit({"type": "result", **payload})
        else:
            self.stream.write((text if text is not None else json.dumps(payload, indent=2, default=_json_default)) + "\n")
            self.stream.flush()

    def error(self, exc: BaseException, exit_code: int) -> None:
        self.close_progress()
        message = str(exc) or exc.__class__.__name__
        if self.json_mode:
            self._emit({"type": "error", "error": exc.__class__.__name__, "message": message, "exit_code": exit_code})
        else:
            print(f"error: {message}", file=sys.stderr, flush=True)


def _json_default(obj: Any):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)
