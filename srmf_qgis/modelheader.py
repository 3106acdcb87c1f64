"""Read the class table of a ``.srmf`` model file without the engine (for dialogs: instant, no torch).

A ``.srmf`` file is safetensors: an 8-byte little-endian header length, then a JSON header whose
``__metadata__.srmf`` entry is the SRMF header as JSON text (see core/modelfile.py). This reads only
that header; anything unexpected raises ValueError and the caller asks the engine (``core info``),
whose messages say exactly what is wrong with the file.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

_MAX_HEADER = 100 * 1024 * 1024


def read_header(path) -> dict:
    """The SRMF header of a model file (a dict with "classes", "architecture", ...).

    Raises:
        ValueError: not a readable SRMF model file (the engine's ``info`` explains why).
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{p}: too short for an SRMF model")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_HEADER or 8 + n > p.stat().st_size:
                raise ValueError(f"{p}: not an SRMF model (bad header length)")
            raw = fh.read(n)
    except OSError as exc:
        raise ValueError(f"{p}: {exc.strerror or exc}") from exc
    try:
        meta = json.loads(raw.decode("utf-8")).get("__metadata__") or {}
        header = json.loads(meta["srmf"])
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ValueError(f"{p}: not an SRMF model ({exc})") from exc
    classes = header.get("classes") if isinstance(header, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, dict) and "id" in c and "name" in c for c in classes):
        raise ValueError(f"{p}: the SRMF header has no valid class table")
    return header
