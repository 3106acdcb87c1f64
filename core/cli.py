"""Command-line interface of the SRMF engine: ``python -m core <command> ... [--json]``.

Commands: ``info MODEL`` (describe a model file), ``segment INPUT OUTPUT`` (streaming segmentation),
``finetune``, ``evaluate``, ``findclass RASTER EXAMPLES OUTPUT_DIR`` (cold-start class discovery),
``findclass-handoff CANDIDATES OUTPUT_DIR --class-name NAME`` (its reviewed candidates → fine-tuning inputs),
``pretrain OUT.srmf --raster A.tif`` (self-supervised pretraining on unlabelled rasters).
Exit codes: 0 success, 1 engine error, 2 bad input (file, band or parameter), 130 cancelled.
With ``--json`` every message is a JSON line (see :mod:`core.protocol`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback
from typing import List, Optional

from .errors import Cancelled, InputError, SRMFError
from .protocol import Reporter


class _Parser(argparse.ArgumentParser):
    """argparse that raises InputError (so --json callers get a JSON error line) instead of exiting."""

    def error(self, message):  # noqa: D401
        raise InputError(f"{self.prog}: {message}")


def int_arg(name):
    """argparse ``type`` for a whole number of pixels: a clear InputError naming the parameter otherwise."""
    def conv(text):
        try:
            return int(text)
        except ValueError:
            raise InputError(f"{name} must be a whole number of pixels, got {text!r}")
    return conv


# name -> (module, argument registrar, runner, help). Every command module is torch-free at import: the
# job behind it is imported by its runner only, so `info` and every `--help` never load torch.
COMMANDS = {
    "info": ("core.cli", "add_info_arguments", "run_info_command", "describe a model file (.srmf)"),
    "segment": ("core.segment.command", "add_segment_arguments", "run_segment_command",
                "segment a raster into a class raster"),
    "finetune": ("core.finetune.command", "add_finetune_arguments", "run_finetune_command",
                 "fine-tune a model on labelled rasters (SRMF training)"),
    "evaluate": ("core.evaluate.command", "add_evaluate_arguments", "run_evaluate_command",
                 "accuracy assessment of a class raster against a reference raster or polygons"),
    "findclass": ("core.findclass.command", "add_findclass_arguments", "run_findclass_command",
                  "find where a new class occurs from a few example polygons (relevance raster, ranked candidates)"),
    "pretrain": ("core.pretrain.command", "add_pretrain_arguments", "run_pretrain_command",
                 "self-supervised pretraining of a model's encoder on unlabelled rasters (SimCLR, GraSS; experimental)"),
    "findclass-handoff": ("core.findclass.command", "add_handoff_arguments", "run_handoff_command",
                          "turn a reviewed candidates.gpkg into labels and a base model with the new class"),
}


def _command(name: str, part: int):
    module, adder, runner, _help = COMMANDS[name]
    return getattr(importlib.import_module(module), (adder, runner)[part])


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser of ``python -m core``: one subcommand per entry of :data:`COMMANDS` (only
    ``command``'s when it names one)."""
    p = _Parser(prog="python -m core", description="SRMF engine: long-tail-aware segmentation of UHR imagery.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (_m, _a, _r, help_text) in COMMANDS.items():
        if command in COMMANDS and name != command:
            continue
        _command(name, 0)(sub.add_parser(name, help=help_text))
    return p


def add_info_arguments(info) -> None:
    """Arguments of ``python -m core info [MODEL]``."""
    info.add_argument("model", nargs="?", default=None, help="model file (default: the embedded default model)")
    info.add_argument("--json", action="store_true", help="print JSON lines")


def run_info_command(args, rep: Reporter) -> dict:
    """Describe a model file from its JSON header (no torch, no weights read)."""
    from core.model.modelfile import DEFAULT_MODEL_PATH, describe, read_header

    path = args.model or str(DEFAULT_MODEL_PATH)
    header = read_header(path)
    text = describe(header, path)
    rep.result({"model": path, "header": header, "description": text}, text=text)
    return header


def _raise_cancelled(signum, frame):
    raise Cancelled(f"cancelled by signal {signal.Signals(signum).name}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rep = Reporter(json_mode="--json" in argv)
    signal.signal(signal.SIGTERM, _raise_cancelled)
    sys.unraisablehook = _quiet_discarded_datasets
    try:
        args = build_parser().parse_args(argv)
        _command(args.command, 1)(args, rep)
        return 0
    except SRMFError as exc:
        rep.error(exc, exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        exc = Cancelled("cancelled by the user")
        rep.error(exc, exc.exit_code)
        return exc.exit_code
    except SystemExit as exc:  # argparse --help
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - anything else: named when it is the machine's, else a bug
        err = machine_error(exc)
        if err is None or os.environ.get("SRMF_DEBUG"):
            rep.log(traceback.format_exc(), "error")  # a bug of ours: the traceback is what a report needs
        err = err or exc
        code = getattr(err, "exit_code", 1)
        rep.error(err, code)
        return code


def _quiet_discarded_datasets(unraisable) -> None:
    """``sys.unraisablehook`` of the CLI: GDAL's error from the destructor of a dataset (its last write
    failing, e.g. a full disk) is dropped — every output that is published is closed and checked first
    (:func:`core.geo.failures.checked_close`), so a dataset closed by the garbage collector is one being
    thrown away after an error that was already reported; anything else goes to Python's default hook."""
    name = getattr(unraisable.object, "__name__", "")
    if isinstance(unraisable.exc_value, RuntimeError) and name.startswith("delete_"):
        return
    sys.__unraisablehook__(unraisable)


def machine_error(exc: BaseException) -> Optional[SRMFError]:
    """The engine error for a failure of the machine or of GDAL that no command wrapped (the last guard of
    "no traceback for what is not a bug", issue 13), or None for anything else (a bug: its traceback is
    logged). An OSError names its file: a full disk or I/O failure is a WriteError (exit 1), a missing
    or forbidden file an InputError (exit 2); MemoryError says what to lower; a GDAL RuntimeError (raised
    from the osgeo bindings) keeps GDAL's message, which names the file."""
    from .errors import write_error

    if isinstance(exc, MemoryError):
        return SRMFError("Out of memory: lower --batch-size or --window, or close other programs, and run again")
    if isinstance(exc, OSError):
        import errno

        if errno.errorcode.get(exc.errno or -1) in ("ENOENT", "EACCES", "EPERM", "EROFS", "ENOTDIR", "EISDIR"):
            return InputError(f"{exc.filename or 'a file'}: {exc.strerror}")
        return write_error(exc.filename or "a file", exc)
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if isinstance(exc, RuntimeError) and tb is not None and "osgeo" in tb.tb_frame.f_code.co_filename:
        return SRMFError(f"GDAL failed: {exc}")
    return None
