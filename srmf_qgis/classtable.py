"""The class table an analyst edits for fine-tuning and evaluation (pure Python, no Qt).

One entry per class: name, colour ``#RRGGBB``, text prompt, and the value that marks the class in the
labels (a pixel value of a class raster, or a value of the polygons' class field). A blank value means
the engine's default: the class's position in the table (0, 1, 2, ...); when evaluating against
polygons, the class name. The new model's class ids are the table's order. It is written as the
engine's ``CLASSES.json`` (core/data.py, ``ClassTable``)::

    {"classes": [{"name": "building", "colour": "#3C1098", "prompt": "A satellite image of building",
                  "value": 1}, {"name": "bare soil", "value": 2, "from": "land"}, ...]}

``from`` names the base model's class that a row continues (a rename keeps that class's classifier);
without it a row continues the base class of the same name, or is a new class.
In Processing it travels as a matrix parameter: a flat list ``[name, colour, prompt, value, from, ...]``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence

COLUMNS = ["Class name", "Colour (#RRGGBB)", "Prompt", "Label value", "Renamed from (base model class)"]
EVAL_COLUMNS = COLUMNS[:4]
PROMPT_TEMPLATE = "A satellite image of {name}"
# Distinct colours for classes that come without one (Okabe-Ito, then Tableau-like).
PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999",
           "#8C564B", "#17BECF", "#BCBD22", "#7F7F7F", "#1F77B4", "#FF7F0E", "#2CA02C", "#D62728"]
_HEX = re.compile(r"^#[0-9A-Fa-f]{6}$")


class ClassTableError(ValueError):
    """An invalid class table; the message says which row and what is wrong."""


@dataclass
class ClassEntry:
    name: str
    colour: str = ""
    prompt: str = ""
    value: Any = None  # label value (int or str); None = the engine's default (the row index)
    source: Optional[str] = None  # the base model's class this row continues (a rename), if any

    def to_json(self) -> dict:
        d = {"name": self.name, "colour": self.colour.upper(), "prompt": self.prompt or default_prompt(self.name)}
        if self.value is not None and str(self.value).strip() != "":
            d["value"] = self.value
        if self.source:
            d["from"] = self.source
        return d


def default_prompt(name: str) -> str:
    return PROMPT_TEMPLATE.format(name=name)


def palette_colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def coerce_value(value: Any, numeric: Optional[bool] = None) -> Any:
    """A label value as the engine should compare it: an int (or float) for class rasters and numeric
    fields, the text for text fields. ``numeric=None``: an int when the text is a whole number."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if numeric is False:
            return str(value)
        return int(value) if float(value).is_integer() else value
    text = str(value).strip()
    if text == "" or text.upper() == "NULL":
        return None
    if numeric is False:
        return text
    try:
        f = float(text)
    except ValueError:
        if numeric:
            raise ClassTableError(f"the label value {text!r} is not a number")
        return text
    return int(f) if f.is_integer() else f


def fill_defaults(entries: Sequence[ClassEntry]) -> List[ClassEntry]:
    """Entries with blank colours and prompts filled in (colours not used by another class)."""
    used = {e.colour.upper() for e in entries if e.colour}
    free = [c for c in PALETTE if c.upper() not in used] or PALETTE
    out, k = [], 0
    for e in entries:
        colour = e.colour
        if not colour:
            colour = free[k % len(free)]
            k += 1
        name = e.name.strip()
        out.append(ClassEntry(name, colour.upper(), (e.prompt or "").strip() or default_prompt(name), e.value,
                              e.source or None))
    return out


def validate(entries: Sequence[ClassEntry], need_values: bool = False) -> None:
    """Raise ClassTableError on: no classes, blank or duplicate names, bad colours, duplicate label
    values (a blank one stands for the row's position), more than 254 classes; with ``need_values``, a
    class without a label value."""
    if not entries:
        raise ClassTableError("The class table is empty: add at least one class (name, colour, prompt, label value).")
    if len(entries) > 254:
        raise ClassTableError(f"At most 254 classes are supported (got {len(entries)}).")
    names, values = {}, {}
    for i, e in enumerate(entries, 1):
        name = (e.name or "").strip()
        if not name:
            raise ClassTableError(f"Row {i} of the class table has no class name.")
        if name.lower() in names:
            raise ClassTableError(f"The class name {name!r} appears twice (rows {names[name.lower()]} and {i}).")
        names[name.lower()] = i
        if e.colour and not _HEX.match(e.colour.strip()):
            raise ClassTableError(f"Row {i} ({name}): the colour {e.colour!r} is not of the form #RRGGBB.")
        blank = e.value is None or str(e.value).strip() == ""
        if blank and need_values:
            raise ClassTableError(f"Row {i} ({name}) has no label value: give the pixel value or field value "
                                  "that marks this class in the labels.")
        key = str(i - 1 if blank else coerce_value(e.value)).strip()
        if key in values:
            raise ClassTableError(f"The label value {key!r} is given to two classes ({values[key]!r} and {name!r})"
                                  + ("; a blank label value stands for the row's position (0, 1, 2, ...)"
                                     if blank else "") + ".")
        values[key] = name


def from_matrix(flat: Sequence[Any], columns: int = len(COLUMNS)) -> List[ClassEntry]:
    """Entries from a Processing matrix value ``[name, colour, prompt, value, from, ...]`` (``columns``
    cells per row: 5 for fine-tuning, 4 for evaluation)."""
    flat = list(flat or [])
    if len(flat) % columns:
        raise ClassTableError(f"The class table needs {columns} columns ({', '.join(COLUMNS[:columns])}); "
                              f"got {len(flat)} cells.")
    out = []
    for i in range(0, len(flat), columns):
        cells = [("" if c is None else str(c)).strip() for c in flat[i:i + columns]] + [""] * (5 - columns)
        name, colour, prompt, value, source = cells[:5]
        if not (name or colour or prompt or value or source):
            continue  # an empty row of the matrix editor
        out.append(ClassEntry(name, colour, prompt, coerce_value(value), source or None))
    return out


def to_matrix(entries: Iterable[ClassEntry], columns: int = len(COLUMNS)) -> List[str]:
    flat: List[str] = []
    for e in entries:
        flat += [e.name, e.colour, e.prompt, "" if e.value is None else str(e.value), e.source or ""][:columns]
    return flat


def to_json(entries: Sequence[ClassEntry]) -> dict:
    return {"classes": [e.to_json() for e in fill_defaults(entries)]}


def write_json(entries: Sequence[ClassEntry], path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(to_json(entries), indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def read_json(path) -> List[ClassEntry]:
    """Entries from a ``CLASSES.json`` file (``{"classes": [...]}`` or a bare list)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ClassTableError(f"Cannot read the class table {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ClassTableError(f"The class table {path} is not valid JSON: {exc}") from exc
    items = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ClassTableError(f"The class table {path} has no list \"classes\".")
    out = []
    for i, c in enumerate(items, 1):
        if not isinstance(c, dict) or not c.get("name"):
            raise ClassTableError(f"Entry {i} of {path} has no \"name\".")
        out.append(ClassEntry(str(c["name"]), str(c.get("colour") or c.get("color") or ""), str(c.get("prompt") or ""),
                              coerce_value(c.get("value")), c.get("from") or None))
    return out


def from_model_classes(classes: Sequence[dict]) -> List[ClassEntry]:
    """Entries from a model header's class table; the label value is the class id, and each row
    continues its base class (so renaming it keeps what the model learnt)."""
    return [ClassEntry(str(c["name"]), str(c.get("colour") or ""), str(c.get("prompt") or ""), int(c["id"]),
                       str(c["name"])) for c in sorted(classes, key=lambda c: int(c["id"]))]
