"""The one class table of the engine (name, colour, prompt, label value, ``from``; IGNORE = 255) and its
readers: fine-tuning, evaluation, class adaptation and findclass all read class tables through here."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union
import numpy as np
from core.errors import InputError
from core.model.text.prompts import PROMPT_TEMPLATE, concept_for_class
from core.geo.raster import hex_to_rgb

IGNORE = 255
"""Label value of pixels that are not learned from (cross-entropy ``ignore_index``)."""
_UNKNOWN = 254  # internal sentinel of the lookup tables: a value that is not in the class table
MAX_CLASSES = 254
_HEX = re.compile(r"^#?[0-9A-Fa-f]{6}$")
_DEFAULT_COLOURS = ["#E6194B", "#3CB44B", "#FFE119", "#4363D8", "#F58231", "#911EB4", "#46F0F0", "#F032E6",
                    "#BCF60C", "#FABEBE", "#008080", "#E6BEFF", "#9A6324", "#FFFAC8", "#800000", "#AAFFC3"]


# -- class table -----------------------------------------------------------------------------------
@dataclass
class ClassInfo:
    """One class: id (0..K-1, its position in the table), name, colour ``#RRGGBB``, text prompt, and the
    value(s) that stand for it in the label source (raster values, field values or ``#RRGGBB`` mask
    colours)."""

    id: int
    name: str
    colour: str
    prompt: str
    values: List[Any]


def default_prompt(name: str) -> str:
    """The text prompt of a class that states none: ``"A satellite image of {concept}"`` with the class's
    concept from the vocabulary (``"barren"`` → ``"bare land"``; an unknown name stands for itself)."""
    return PROMPT_TEMPLATE.format(concept=concept_for_class(name))


def _norm_hex(c: str) -> str:
    c = str(c).strip()
    if not _HEX.match(c):
        raise ValueError(c)
    return "#" + c.lstrip("#").upper()


def value_key(v: Any) -> str:
    """Canonical text of a label value, so that 3, 3.0 and "3" match (and "#3c1098" matches "#3C1098")."""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return str(int(v)) if float(v).is_integer() else repr(float(v))
    s = str(v).strip()
    if _HEX.match(s) and s.startswith("#"):
        return s.upper()
    try:
        f = float(s)
        return str(int(f)) if f.is_integer() else repr(f)
    except ValueError:
        return s


def _lut_index(v, size: int) -> Optional[int]:
    """``v`` as an index 0..size-1 of a lookup table when it is a whole number in range, else None."""
    try:
        iv = float(v)
    except (TypeError, ValueError):
        return None
    return int(iv) if iv.is_integer() and 0 <= iv < size else None


class ClassTable:
    """The classes to learn, ids 0..K-1 in table order, and how label sources encode them.

    Each entry: ``{"name", "colour": "#RRGGBB", "prompt", "value"}``. ``value`` (or ``values``, a list)
    is what appears in the label source: a raster value (int), a polygon field value (int or string) or,
    for colour-coded masks, an RGB colour ``"#RRGGBB"``; without one the class's id is its value.
    ``ignore``: source values (or colours) that mean "unlabelled" and become 255. A table is colour-coded
    (:attr:`kind` ``"rgb"``) when its values are colours, else ``"value"``. ``prompt`` defaults to
    :func:`default_prompt` (the vocabulary's concept), ``colour`` to a fixed palette.

    Raises:
        InputError: no class, more than 254 classes, a class without name, duplicate names or values,
            a malformed colour, a mix of colour and non-colour values.
    """

    def __init__(self, classes: Sequence[dict], ignore: Sequence[Any] = (), where: str = "class table"):
        self.where = where
        if not classes:
            raise InputError(f"{where}: no classes")
        if len(classes) > MAX_CLASSES:
            raise InputError(f"{where}: {len(classes)} classes; at most {MAX_CLASSES} are supported")
        self.classes: List[ClassInfo] = []
        seen_names, seen_values = {}, {}
        for i, c in enumerate(classes):
            if not isinstance(c, dict):
                raise InputError(f"{where}: class {i} must be an object with name/colour/prompt/value, got {c!r}")
            name = str(c.get("name", "")).strip()
            if not name:
                raise InputError(f"{where}: class {i} has no name")
            if name.lower() in seen_names:
                raise InputError(f"{where}: class name {name!r} appears twice (classes {seen_names[name.lower()]} and {i})")
            seen_names[name.lower()] = i
            colour = c.get("colour", c.get("color")) or _DEFAULT_COLOURS[i % len(_DEFAULT_COLOURS)]
            try:
                colour = _norm_hex(colour)
            except ValueError:
                raise InputError(f"{where}: class {name!r} has colour {colour!r}; expected #RRGGBB") from None
            if "values" in c:
                values = list(c["values"]) if isinstance(c["values"], (list, tuple)) else [c["values"]]
            elif "value" in c and c["value"] is not None:
                values = list(c["value"]) if isinstance(c["value"], (list, tuple)) else [c["value"]]
            else:
                values = [i]
            for v in values:
                k = value_key(v)
                if k in seen_values:
                    raise InputError(f"{where}: value {v!r} is given to two classes "
                                     f"({self.classes[seen_values[k]].name!r} and {name!r})")
                seen_values[k] = i
            prompt = str(c.get("prompt") or default_prompt(name))
            self.classes.append(ClassInfo(i, name, colour, prompt, values))
        self.ignore = list(ignore)
        for v in self.ignore:
            k = value_key(v)
            if k in seen_values:
                raise InputError(f"{where}: value {v!r} is both ignored and the value of class "
                                 f"{self.classes[seen_values[k]].name!r}")
        self._lookup = seen_values
        self._ignore_keys = {value_key(v) for v in self.ignore}
        colourish = [isinstance(v, str) and v.strip().startswith("#") for c in self.classes for v in c.values]
        if any(colourish) and not all(colourish):
            raise InputError(f"{where}: class values mix colours (#RRGGBB) and other values")
        self.kind = "rgb" if all(colourish) else "value"
        if self.kind == "rgb":
            for c in self.classes:
                for v in c.values:
                    try:
                        _norm_hex(v)
                    except ValueError:
                        raise InputError(f"{where}: class {c.name!r} has value {v!r}; expected #RRGGBB") from None
        self._rgb_lut: Optional[np.ndarray] = None

    # construction
    @classmethod
    def from_json(cls, path) -> "ClassTable":
        """Load ``{"classes": [...], "ignore": [...]}`` (or a bare list of classes) from a JSON file.

        Raises:
            InputError: the file is missing or not valid JSON, or the table is invalid (see the class).
        """
        p = Path(path)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"Class table not found: {p}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"Class table {p} is not valid JSON ({exc})") from exc
        return cls.from_obj(doc, where=str(p))

    @classmethod
    def from_obj(cls, doc: Union[dict, list, "ClassTable"], where: str = "class table") -> "ClassTable":
        """A table from a dict ``{"classes": [...], "ignore": [...]}``, a list of class dicts, or a table."""
        if isinstance(doc, ClassTable):
            return doc
        if isinstance(doc, list):
            return cls(doc, (), where)
        if not isinstance(doc, dict) or not isinstance(doc.get("classes"), list):
            raise InputError(f"{where}: expected {{\"classes\": [...]}}")
        ignore = doc.get("ignore", [])
        if not isinstance(ignore, (list, tuple)):
            ignore = [ignore]
        return cls(doc["classes"], ignore, where)

    # queries
    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        return iter(self.classes)

    @property
    def names(self) -> List[str]:
        return [c.name for c in self.classes]

    @property
    def colours(self) -> List[str]:
        return [c.colour for c in self.classes]

    @property
    def prompts(self) -> List[str]:
        return [c.prompt for c in self.classes]

    def index(self, name_or_id: Union[str, int]) -> int:
        """Class id of a class name (case-insensitive) or id. Raises InputError when there is none."""
        if isinstance(name_or_id, (int, np.integer)) and not isinstance(name_or_id, bool):
            if 0 <= int(name_or_id) < len(self):
                return int(name_or_id)
        else:
            for c in self.classes:
                if c.name.lower() == str(name_or_id).strip().lower():
                    return c.id
        raise InputError(f"{self.where}: no class {name_or_id!r} (classes: {', '.join(self.names)})")

    def to_header(self) -> List[dict]:
        """The classes as the model file's header stores them: ``[{"id", "name", "colour", "prompt"}]``."""
        return [{"id": c.id, "name": c.name, "colour": c.colour, "prompt": c.prompt} for c in self.classes]

    def to_obj(self) -> dict:
        """JSON-able ``{"classes": [...], "ignore": [...]}`` that :meth:`from_obj` reads back."""
        return {"classes": [{"name": c.name, "colour": c.colour, "prompt": c.prompt,
                             "value": c.values[0] if len(c.values) == 1 else list(c.values)} for c in self.classes],
                "ignore": list(self.ignore)}

    def lookup(self, value: Any) -> Optional[int]:
        """Class id of one source value; :data:`IGNORE` for an ignored value; None when unknown."""
        k = value_key(value)
        if k in self._ignore_keys:
            return IGNORE
        return self._lookup.get(k)

    # mapping arrays
    def map_values(self, arr: np.ndarray, nodata: Optional[float] = None, where: str = "label") -> np.ndarray:
        """Map an array of raster values (any numeric dtype, any shape) to class ids.

        Returns uint8 of ``arr``'s shape: ids 0..K-1, 255 for ``nodata``, NaN and ignored values.

        Raises:
            InputError: values that are neither in the table, ignored nor nodata, listed with their
                pixel counts; or a colour-coded table (use :meth:`map_rgb`).
        """
        if self.kind == "rgb":
            raise InputError(f"{where}: the class table gives mask colours (#RRGGBB) but the label has one band "
                             "of plain values (no colour table); give raster values in the table instead")
        a = np.asarray(arr)
        out_of_table: Dict[str, int] = {}
        if a.dtype in (np.uint8, np.uint16):
            lut = np.full(256 if a.dtype == np.uint8 else 65536, _UNKNOWN, np.uint8)
            self._fill_lut(lut, nodata)
            out = lut[a]
        else:
            vals, inv = np.unique(a.ravel(), return_inverse=True)
            ids = np.empty(len(vals), np.uint8)
            for j, v in enumerate(vals):
                if (nodata is not None and (v == nodata or (np.isnan(nodata) and np.isnan(v)))) or \
                        (isinstance(v, (float, np.floating)) and np.isnan(v)):
                    ids[j] = IGNORE
                else:
                    c = self.lookup(v)
                    ids[j] = _UNKNOWN if c is None else c
            out = ids[inv].reshape(a.shape)
        bad = out == _UNKNOWN
        if bad.any():
            vals, counts = np.unique(a[bad], return_counts=True)
            for v, n in zip(vals, counts):
                out_of_table[value_key(v)] = int(n)
            raise InputError(self._unexpected_message(where, out_of_table, "value"))
        return out

    def _fill_lut(self, lut: np.ndarray, nodata: Optional[float]) -> None:
        for values, target in [(c.values, c.id) for c in self.classes] + [(self.ignore, IGNORE)]:
            for v in values:
                i = _lut_index(v, len(lut))
                if i is not None:
                    lut[i] = target
        if nodata is not None and not np.isnan(nodata) and float(nodata).is_integer() and 0 <= nodata < len(lut):
            lut[int(nodata)] = IGNORE

    def map_rgb(self, rgb: np.ndarray, where: str = "mask", channels_first: Optional[bool] = None) -> np.ndarray:
        """Map colour-coded mask pixels uint8 (3, H, W) or (H, W, 3) to class ids uint8 (H, W).

        ``channels_first`` says which layout ``rgb`` has (default: guessed from where the 3 is).

        Class colours → ids, ignored colours → 255.

        Raises:
            InputError: colours not in the table (listed as #RRGGBB with pixel counts), or a table of
                plain values.
        """
        if self.kind != "rgb":
            raise InputError(f"{where}: the mask is colour-coded (RGB) but the class table gives plain values; "
                             "give each class its mask colour as value \"#RRGGBB\"")
        a = np.asarray(rgb)
        if a.ndim != 3 or 3 not in (a.shape[0], a.shape[-1]):
            raise InputError(f"{where}: expected an RGB mask, got an array of shape {a.shape}")
        if channels_first is None:
            channels_first = a.shape[0] == 3 and a.shape[-1] != 3
        if channels_first:
            r, g, b = a[0], a[1], a[2]
        else:
            r, g, b = a[..., 0], a[..., 1], a[..., 2]
        key = (r.astype(np.uint32) << 16) | (g.astype(np.uint32) << 8) | b.astype(np.uint32)
        if self._rgb_lut is None:
            lut = np.full(1 << 24, _UNKNOWN, np.uint8)
            for c in self.classes:
                for v in c.values:
                    rr, gg, bb = hex_to_rgb(_norm_hex(v))
                    lut[(rr << 16) | (gg << 8) | bb] = c.id
            for v in self.ignore:
                rr, gg, bb = hex_to_rgb(_norm_hex(v))
                lut[(rr << 16) | (gg << 8) | bb] = IGNORE
            self._rgb_lut = lut
        out = self._rgb_lut[key]
        bad = out == _UNKNOWN
        if bad.any():
            vals, counts = np.unique(key[bad], return_counts=True)
            found = {f"#{int(v):06X}": int(n) for v, n in zip(vals, counts)}
            raise InputError(self._unexpected_message(where, found, "colour"))
        return out

    def _unexpected_message(self, where: str, found: Dict[str, int], what: str) -> str:
        items = sorted(found.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{k} ({n} px)" for k, n in items[:20])
        more = f" and {len(items) - 20} more" if len(items) > 20 else ""
        known = ", ".join(f"{c.name}={'/'.join(map(str, c.values))}" for c in self.classes)
        ign = f"; ignored: {', '.join(map(str, self.ignore))}" if self.ignore else ""
        return (f"{where}: {len(items)} {what}{'s' if len(items) != 1 else ''} not in the class table: {shown}{more}. "
                f"Known: {known}{ign}. Add them to the table, or to its \"ignore\" list")

    def __repr__(self) -> str:
        return f"ClassTable({', '.join(self.names)}; kind={self.kind})"


def load_class_table(spec: Union[str, os.PathLike, dict, list, ClassTable]) -> ClassTable:
    """A :class:`ClassTable` from a JSON file path, a dict / list, or a table (returned as is)."""
    if isinstance(spec, (str, os.PathLike)):
        return ClassTable.from_json(spec)
    return ClassTable.from_obj(spec)


def dubai_class_table() -> ClassTable:
    """The Dubai aerial set (Humans in the Loop / MBRSC) with the TRUE mask colours.

    building #3C1098, land #8429F6, road #6EC1E4, vegetation #FEDD3A, water #E2A929 → ids 0..4;
    Unlabeled #9B9B9B and the undocumented black #000000 → 255. (The colours in the set's
    ``classes.json`` are the annotation tool's display palette and do not occur in the masks.)
    Prompts match the embedded default model (``core.model.default``).
    """
    return ClassTable([
        {"name": "building", "colour": "#3C1098", "value": "#3C1098", "prompt": "A satellite image of building"},
        {"name": "land", "colour": "#8429F6", "value": "#8429F6", "prompt": "A satellite image of unpaved land"},
        {"name": "road", "colour": "#6EC1E4", "value": "#6EC1E4", "prompt": "A satellite image of road"},
        {"name": "vegetation", "colour": "#FEDD3A", "value": "#FEDD3A", "prompt": "A satellite image of vegetation"},
        {"name": "water", "colour": "#E2A929", "value": "#E2A929", "prompt": "A satellite image of water"},
    ], ignore=["#9B9B9B", "#000000"], where="Dubai class table")


def loveda_class_table() -> ClassTable:
    """LoveDA raw label codes: 0 no-data → 255; 1 background .. 7 agriculture → ids 0..6 (mmseg's
    ``reduce_zero_label``), with mmsegmentation's LoveDA palette."""
    names = [("background", "#FFFFFF"), ("building", "#FF0000"), ("road", "#FFFF00"), ("water", "#0000FF"),
             ("barren", "#9F81B7"), ("forest", "#00FF00"), ("agriculture", "#FFC380")]
    return ClassTable([{"name": n, "colour": c, "value": i + 1} for i, (n, c) in enumerate(names)],
                      ignore=[0], where="LoveDA class table")


def isprs_class_table() -> ClassTable:
    """ISPRS Potsdam/Vaihingen labels as mmsegmentation converts them: 0 boundary/ignore → 255;
    1 impervious surface .. 6 clutter → ids 0..5, with the ISPRS colours."""
    names = [("impervious surface", "#FFFFFF"), ("building", "#0000FF"), ("low vegetation", "#00FFFF"),
             ("tree", "#00FF00"), ("car", "#FFFF00"), ("clutter", "#FF0000")]
    return ClassTable([{"name": n, "colour": c, "value": i + 1} for i, (n, c) in enumerate(names)],
                      ignore=[0], where="ISPRS class table")

def normalise_class_table(classes: Sequence[dict]) -> List[dict]:
    """Check a class table and give each entry an id (0..K-1 in order), a colour and a prompt.

    Raises:
        InputError: empty table, a class without a name, duplicate names, more than 255 classes,
            a colour that is not #RRGGBB.
    """
    if not classes:
        raise InputError("The class table is empty: give at least one class")
    if len(classes) > 255:
        raise InputError(f"The class table has {len(classes)} classes; at most 255 are supported")
    out, seen = [], set()
    for i, c in enumerate(classes):
        name = str(c.get("name", "")).strip()
        if not name:
            raise InputError(f"Class {i + 1} of the class table has no name")
        if name.lower() in seen:
            raise InputError(f"The class table names {name!r} twice")
        seen.add(name.lower())
        colour = str(c.get("colour") or _DEFAULT_COLOURS[i % len(_DEFAULT_COLOURS)])
        if not (len(colour) == 7 and colour.startswith("#") and _HEX.match(colour)):
            raise InputError(f"Class {name!r}: colour must be #RRGGBB, got {colour!r}")
        entry = {**c, "id": i, "name": name, "colour": colour.upper(), "prompt": str(c.get("prompt") or default_prompt(name))}
        out.append(entry)
    return out


# -- the reference classes of an accuracy assessment -----------------------------------------------
def colour_rgb(colour) -> Optional[Tuple[int, int, int]]:
    """``"#RRGGBB"`` → (r, g, b) in 0..255; None for anything that is not such a colour."""
    if not isinstance(colour, str):
        return None
    try:
        return hex_to_rgb(colour.strip())
    except ValueError:
        return None


def reference_classes(entries, source: str) -> List[dict]:
    """The classes of an accuracy assessment: ``[{"id", "name", "colour", "values"}]``, ids as given (the
    prediction's class ids, 0..254) or by position. Raises InputError naming ``source``."""
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{source}: the class table must hold a non-empty list 'classes'")
    out, ids, names = [], set(), set()
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"name": e}
        if not isinstance(e, dict) or not str(e.get("name", "")).strip():
            raise InputError(f"{source}: class entry {i} has no 'name' ({e!r})")
        cid = e.get("id", i)
        if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid <= 254:
            raise InputError(f"{source}: class {e['name']!r} has id {cid!r}; ids are whole numbers 0..254 "
                             "(255 is nodata)")
        if cid in ids:
            raise InputError(f"{source}: class id {cid} is used twice")
        name = str(e["name"]).strip()
        if name.lower() in names:
            raise InputError(f"{source}: class name {name!r} is used twice")
        ids.add(cid)
        names.add(name.lower())
        value = e.get("values", e.get("value"))
        values = None if value is None else (list(value) if isinstance(value, (list, tuple)) else [value])
        out.append({"id": cid, "name": name, "colour": e.get("colour") or e.get("color"),
                    "values": values})
    return out


def read_reference_classes(classes) -> Tuple[List[dict], Optional[Union[str, int]], list, str]:
    """A class table from a JSON file, a model file (``.srmf``), or a Python list/dict.

    The same file as fine-tuning's (:class:`ClassTable`): ``{"classes": [{"name", "colour", "prompt",
    "value" | "values"}], "ignore": [values that mean unlabelled]}``, plus, for polygon references,
    ``"background"``: the class (name or id) of pixels covered by no polygon.

    Returns:
        ``(classes, background, ignore, source)``: classes = ``[{"id", "name", "colour", "values"}]``;
        background = the top-level ``background`` entry (class name or id) or None; ignore = list.

    Raises:
        InputError: missing or unreadable file, invalid JSON, a bad entry (named).
    """
    if isinstance(classes, (list, tuple)):
        return reference_classes(list(classes), "classes"), None, [], "classes"
    if isinstance(classes, dict):
        return (reference_classes(classes.get("classes"), "classes"), classes.get("background"),
                _as_list(classes.get("ignore")), "classes")
    p = Path(classes)
    if not p.is_file():
        raise InputError(f"Class table not found: {p}")
    if p.suffix.lower() == ".srmf":
        from core.model.modelfile import read_header

        return reference_classes(read_header(p)["classes"], str(p)), None, [], str(p)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"Class table {p} is not readable JSON ({exc})") from exc
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict):
        raise InputError(f"Class table {p}: expected an object {{\"classes\": [...]}}")
    return reference_classes(data.get("classes"), str(p)), data.get("background"), _as_list(data.get("ignore")), str(p)


def _as_list(v) -> list:
    return [] if v is None else (list(v) if isinstance(v, (list, tuple)) else [v])


def classes_from_raster(ds) -> Optional[List[dict]]:
    """Classes from a class raster's category names (and colour table), or None when it has none."""
    band = ds.GetRasterBand(1)
    band.GetNoDataValue()  # GDAL 3.6 GTiff: loads the .aux.xml (PAM); GetCategoryNames() alone does not
    names = band.GetCategoryNames() or []
    ct = band.GetColorTable()
    out = []
    for i, n in enumerate(names[:255]):
        if n and str(n).strip():
            colour = None
            if ct is not None and i < ct.GetCount():
                r, g, b = ct.GetColorEntry(i)[:3]
                colour = f"#{r:02X}{g:02X}{b:02X}"
            out.append({"id": i, "name": str(n).strip(), "colour": colour, "values": None})
    return out or None
