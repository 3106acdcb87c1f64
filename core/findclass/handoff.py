"""The hand-off of a reviewed findclass run to fine-tuning: labels (examples + accepted candidates), a base
model with the new class (classifier row from the centroids), the class table and the sources file."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple
import torch
from core.errors import InputError
from core.findclass.candidates import read_candidates
from core.findclass.params import STATUSES
from core.findclass.examples import is_negative
from core.files import atomic_output


@dataclass
class HandOff:
    """What :func:`handoff` gives fine-tuning.

    Attributes:
        class_name: the new class. raster: the raster the candidates are on.
        polygons: ``[(wkt, source)]`` in the candidates' CRS — the positive examples (source
            ``"example"``) and the accepted candidates (``"candidate"``).
        srs_wkt: their CRS (WKT) or None.
        init_features: ``{class_name: float32 (K, 256)}`` — the fused-space centroids, for
            :func:`core.model.adapt.adapt_classes` (the row starts at their normalised mean).
        counts: accepted / rejected / pending candidates, examples used.
    """

    class_name: str
    raster: str
    polygons: List[Tuple[str, str]]
    srs_wkt: Optional[str]
    init_features: Dict[str, torch.Tensor]
    counts: Dict[str, int]


def handoff(candidates, class_name: str) -> HandOff:
    """Accepted candidates plus the positive example polygons → the new class's training labels, and the
    centroids → its classifier row (CAT → fine-tuning hand-off). Rejected and pending candidates are left
    out; negative examples are left out.

    Raises:
        InputError: see :func:`read_candidates`; an empty class name; the example layer is gone.
    """
    from osgeo import osr

    from core.geo.vector import open_layer, traditional

    name = str(class_name or "").strip()
    if not name:
        raise InputError("the new class needs a name")
    meta, rows = read_candidates(candidates)
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in STATUSES}
    polys = [(r["wkt"], "candidate") for r in rows if r["status"] == "accepted" and r["wkt"]]
    dst = None
    if meta.get("_srs_wkt"):
        dst = osr.SpatialReference()
        dst.ImportFromWkt(meta["_srs_wkt"])
        dst = traditional(dst)
    vds, lyr = open_layer(meta["examples"], meta.get("layer"))
    src = traditional(lyr.GetSpatialRef())
    ct = osr.CoordinateTransformation(src, dst) if src is not None and dst is not None and not src.IsSame(dst) else None
    nf = meta.get("negative_field")
    n_ex = 0
    for f in lyr:
        g = f.GetGeometryRef()
        if g is None or g.IsEmpty():
            continue
        if nf:
            idx = f.GetFieldIndex(nf)
            if idx >= 0 and f.IsFieldSetAndNotNull(idx) and is_negative(f.GetField(idx)):
                continue
        g = g.Clone()
        if ct is not None:
            g.Transform(ct)
        polys.append((g.ExportToWkt(), "example"))
        n_ex += 1
    vds = None
    counts["examples"] = n_ex
    init = torch.tensor(meta["init_centroids"], dtype=torch.float32)
    return HandOff(name, meta["raster"], polys, meta.get("_srs_wkt"), {name: init}, counts)


def write_handoff(candidates, out_dir, class_name: str, base_model=None, text_encoder=None,
                  colour: Optional[str] = None) -> dict:
    """Write the files ``python -m core finetune`` takes for the new class.

    Writes into ``out_dir``: ``labels.gpkg`` (examples + accepted candidates, field ``class`` = the class
    name), ``sources.json`` (``[{"raster", "polygons", "field": "class"}]``), ``classes.json`` (the base
    model's classes, then the new one with value = its name) and ``base_with_class.srmf``: the base model
    with the class added by :func:`core.model.adapt.adapt_classes` with ``init_features`` = the centroids, so
    its classifier row starts at their normalised mean (fine-tuning keeps rows of classes it finds in the
    base model). Then::

        python -m core finetune OUT.srmf --base-model base_with_class.srmf --sources sources.json \\
            --classes classes.json

    The labels hold only the new class: add labels of the other classes to ``sources.json`` (or the
    model learns to see the new class everywhere).

    Returns:
        ``{"labels", "sources", "classes", "base_model", "counts"}`` paths and counts.

    Raises:
        InputError: see :func:`handoff`; a base model that already has the class.
    """
    from core.model.modelfile import DEFAULT_MODEL_PATH, LoadedModel, load_model, save_model

    h = handoff(candidates, class_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = base_model if isinstance(base_model, LoadedModel) else load_model(base_model or DEFAULT_MODEL_PATH)
    if any(str(c["name"]).lower() == h.class_name.lower() for c in lm.classes):
        raise InputError(f"the base model already has a class {h.class_name!r}; choose another name")
    labels = out / "labels.gpkg"
    _write_labels(h, labels)
    model, header, classes, report = _with_class(lm, h, colour, text_encoder, candidates)
    base_path = save_model(out / "base_with_class.srmf", model, header)
    (out / "classes.json").write_text(json.dumps({"classes": classes}, indent=2), encoding="utf-8")
    sources = [{"raster": h.raster, "polygons": str(labels.resolve()), "field": "class"}]
    (out / "sources.json").write_text(json.dumps(sources, indent=2), encoding="utf-8")
    return {"labels": str(labels), "sources": str(out / "sources.json"), "classes": str(out / "classes.json"),
            "base_model": str(base_path), "counts": h.counts, "class_changes": report}


def _write_labels(h: HandOff, labels: Path) -> None:
    """The hand-off's polygons as the GeoPackage ``labels`` (fields ``class`` = the class name and
    ``source``), written under a temporary name and published when complete."""
    from osgeo import ogr, osr

    from core.geo.failures import checked_close, writing

    srs = None
    if h.srs_wkt:
        srs = osr.SpatialReference()
        srs.ImportFromWkt(h.srs_wkt)
    with atomic_output(labels, create=False) as tmp, writing(labels):  # the GPKG driver creates the file
        ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(tmp))
        lyr = ds.CreateLayer("labels", srs=srs, geom_type=ogr.wkbUnknown)
        lyr.CreateField(ogr.FieldDefn("class", ogr.OFTString))
        lyr.CreateField(ogr.FieldDefn("source", ogr.OFTString))
        for wkt, source in h.polygons:
            f = ogr.Feature(lyr.GetLayerDefn())
            f.SetField("class", h.class_name)
            f.SetField("source", source)
            f.SetGeometry(ogr.CreateGeometryFromWkt(wkt))
            lyr.CreateFeature(f)
        lyr = f = None
        with checked_close(labels):
            ds = None


def _with_class(lm, h: HandOff, colour: Optional[str], text_encoder, candidates):
    """The base model with the new class added (:func:`core.model.adapt.adapt_classes`, its row from the
    centroids) and the class table for fine-tuning (``value`` = id, the new class's = its name).

    Returns:
        ``(model, header with the hand-off in its provenance, classes, adapt_classes' report)``.
    """
    from core.model.adapt import adapt_classes

    classes = [{"name": c["name"], "colour": c.get("colour"), "prompt": c.get("prompt"), "value": int(c["id"])}
               for c in lm.classes]
    new = {"name": h.class_name, "value": h.class_name}
    if colour:
        new["colour"] = colour
    model, header, report = adapt_classes(lm.model, lm.header, [dict(c) for c in lm.classes] + [dict(new)],
                                          text_encoder=text_encoder, init_features=h.init_features)
    new_entry = header["classes"][-1]
    classes.append({"name": new_entry["name"], "colour": new_entry["colour"], "prompt": new_entry["prompt"],
                    "value": h.class_name})
    header.setdefault("provenance", {})
    # "coldstart": the key model files written so far carry (a file format: kept as it is)
    header["provenance"] = {**header["provenance"], "coldstart": {
        "class": h.class_name, "candidates": str(Path(str(candidates)).resolve()), "counts": h.counts,
        "init": "classifier row from the normalised mean of the findclass centroids"}}
    return model, header, classes, report
