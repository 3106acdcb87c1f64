"""Command-line interface of the SRMF engine: ``python -m core <command> ... [--json]``.

Commands: ``info MODEL`` (describe a model file), ``segment INPUT OUTPUT`` (streaming segmentation),
``finetune``, ``evaluate``, ``findclass RASTER EXAMPLES OUTPUT_DIR`` (cold-start class discovery),
``findclass-handoff CANDIDATES OUTPUT_DIR --class-name NAME`` (its reviewed candidates → fine-tuning inputs).
Exit codes: 0 success, 1 engine error, 2 bad input (file, band or parameter), 130 cancelled.
With ``--json`` every message is a JSON line (see :mod:`core.protocol`).
"""
from __future__ import annotations

import argparse
import importlib
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


def _int_arg(name):
    def conv(text):
        try:
            return int(text)
        except ValueError:
            raise InputError(f"{name} must be a whole number of pixels, got {text!r}")
    return conv


HEAVY_COMMANDS = {
    "finetune": (".finetune", "add_finetune_arguments", "fine-tune a model on labelled rasters (SRMF training)"),
    "evaluate": (".evaluate", "add_evaluate_arguments",
                 "accuracy assessment of a class raster against a reference raster or polygons"),
    "findclass": (".coldstart", "add_findclass_arguments",
                  "find where a new class occurs from a few example polygons (relevance raster, ranked candidates)"),
    "findclass-handoff": (".coldstart", "add_handoff_arguments",
                          "turn a reviewed candidates.gpkg into labels and a base model with the new class"),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser; ``command`` = the subcommand being run (its arguments are registered)."""
    p = _Parser(prog="python -m core", description="SRMF engine: long-tail-aware segmentation of UHR imagery.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="describe a model file (.srmf)")
    info.add_argument("model", nargs="?", default=None, help="model file (default: the embedded default model)")
    info.add_argument("--json", action="store_true", help="print JSON lines")

    seg = sub.add_parser("segment", help="segment a raster into a class raster")
    seg.add_argument("input", help="input raster (any format GDAL reads)")
    seg.add_argument("output", help="output class raster (GeoTIFF, uint8, 255 = nodata)")
    seg.add_argument("--model", default=None, help="model file (default: the embedded default model)")
    seg.add_argument("--window", type=_int_arg("--window"), default=None, help="window (tile) size in pixels (default: the model's, 512)")
    seg.add_argument("--stride", type=_int_arg("--stride"), default=None, help="stride in pixels (default: the model's, 341)")
    seg.add_argument("--batch-size", type=_int_arg("--batch-size"), default=None, help="windows per forward pass")
    seg.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    seg.add_argument("--bands", default=None, help="1-based input bands in the model's order, e.g. 3,2,1; one band is replicated")
    seg.add_argument("--probabilities", default=None, help="also write per-class probabilities (uint8 GeoTIFF, p*250)")
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    seg.add_argument("--json", action="store_true", help="print JSON lines (progress, log, result, error)")
    # Commands whose modules import torch register their arguments only when they are the command
    # being run, so that `info` and `--help` stay light (no torch import).
    for name, (module, adder, help_text) in HEAVY_COMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        if command == name:
            getattr(importlib.import_module(module, __package__), adder)(sp)
        else:
            sp.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _cmd_info(args, rep: Reporter) -> dict:
    from .modelfile import DEFAULT_MODEL_PATH, describe, read_header

    path = args.model or str(DEFAULT_MODEL_PATH)
    header = read_header(path)
    text = describe(header, path)
    rep.result({"model": path, "header": header, "description": text}, text=text)
    return header


def _cmd_segment(args, rep: Reporter) -> dict:
    from .raster import parse_bands
    from .segment import segment_raster

    result = segment_raster(args.input, args.output, args.model, window=args.window, stride=args.stride,
                            batch_size=args.batch_size, device=args.device, bands=parse_bands(args.bands),
                            probabilities=args.probabilities, overwrite=args.overwrite, reporter=rep)
    lines = [f"Wrote {result['output']} ({result['width']} x {result['height']} px, {result['crs'] or 'no CRS'}) "
             f"in {result['seconds']:.1f} s ({result['megapixels_per_second']:.2f} MP/s on {result['device']})"]
    if result["probabilities"]:
        lines.append(f"Wrote {result['probabilities']} (per-class probability x 250)")
    lines.append(f"{'class':<20s} {'pixels':>12s} {'area (ha)':>12s}")
    for a in result["class_areas"]:
        ha = "" if a["area_ha"] is None else f"{a['area_ha']:.4f}"
        lines.append(f"{a['name']:<20s} {a['pixels']:>12d} {ha:>12s}")
    if result["area_note"]:
        lines.append("Note: " + result["area_note"])
    if result["untrained_model"]:
        lines.append("WARNING: the model is an UNTRAINED PLACEHOLDER; the classes are not meaningful.")
    rep.result(result, text="\n".join(lines))
    return result


def _cmd_evaluate(args, rep: Reporter) -> dict:
    from .evaluate import run_evaluate_command

    return run_evaluate_command(args, rep)


def _cmd_finetune(args, rep: Reporter) -> dict:
    from .finetune import run_finetune_command

    return run_finetune_command(args, rep)


def _cmd_findclass(args, rep: Reporter) -> dict:
    from .coldstart import run_findclass_command

    return run_findclass_command(args, rep)


def _cmd_findclass_handoff(args, rep: Reporter) -> dict:
    from .coldstart import run_handoff_command

    return run_handoff_command(args, rep)


COMMANDS = {"info": _cmd_info, "segment": _cmd_segment, "evaluate": _cmd_evaluate, "finetune": _cmd_finetune,
            "findclass": _cmd_findclass, "findclass-handoff": _cmd_findclass_handoff}


def _raise_cancelled(signum, frame):
    raise Cancelled(f"cancelled by signal {signal.Signals(signum).name}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rep = Reporter(json_mode="--json" in argv)
    signal.signal(signal.SIGTERM, _raise_cancelled)
    try:
        command = next((a for a in argv if not a.startswith("-")), None)
        args = build_parser(command).parse_args(argv)
        COMMANDS[args.command](args, rep)
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
    except Exception as exc:  # noqa: BLE001 - report anything else as an engine error, with a traceback
        rep.log(traceback.format_exc(), "error")
        rep.error(exc, 1)
        return 1
