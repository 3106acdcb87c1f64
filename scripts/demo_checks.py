"""What the demo's map can be checked against: the reference data that come with two of the shared scenes.

``check_scene(input_raster, class_raster, class_names)`` returns ``None`` for a scene without reference
data, else a dict ``{"reference": str, "figures": {name: value}, "lines": [str], "caption": str}``:

- ``deepforest_neon_osbs/OSBS_029.tif`` (NEON, open pine forest, 10 cm): the scene has no building, road or
  water, so every pixel given one of those classes is wrong; the 61 tree-crown boxes of ``OSBS_029.csv``
  (pixel coordinates, DeepForest) should be vegetation. Figures: the share of the scene per class, and the
  share of crown-box pixels called vegetation.
- ``solaris_spacenet_atlanta/sample_geotiff.tif`` (SpaceNet, 0.5 m pan): the 43 building footprints of
  ``geotiff_labels.geojson`` rasterised onto the class raster's grid (GDAL, pixel centres): building IoU,
  precision and recall.

The class raster must be on the input's grid (what ``srmf:segment`` writes, whatever the processing
resolution); 255 is nodata and is left out. GDAL and NumPy only (runs in QGIS's Python).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from osgeo import gdal

NODATA = 255


def _read(path: Path) -> np.ndarray:
    ds = gdal.Open(str(path))
    if ds is None:
        raise OSError(f"cannot open {path}")
    band = ds.GetRasterBand(1)
    return band.ReadAsArray()


def _share(classes: np.ndarray, valid: np.ndarray, cid: Optional[int]) -> float:
    if cid is None or not valid.any():
        return 0.0
    return float(((classes == cid) & valid).sum() / valid.sum())


def _osbs(src: Path, classes: np.ndarray, names: Sequence[str]) -> dict:
    ids = {n: i for i, n in enumerate(names)}
    valid = classes != NODATA
    crowns = np.zeros(classes.shape, bool)
    with open(src.with_suffix(".csv"), newline="") as fh:
        boxes = [r for r in csv.DictReader(fh) if r["image_path"] == src.name]
    for r in boxes:
        crowns[int(r["ymin"]):int(r["ymax"]), int(r["xmin"]):int(r["xmax"])] = True
    share = {n: _share(classes, valid, ids.get(n)) for n in names}
    wrong = sum(share.get(n, 0.0) for n in ("building", "road", "water"))
    in_crowns = _share(classes, valid & crowns, ids.get("vegetation"))
    figures = {**{f"share {n}": v for n, v in share.items()}, "share building+road+water (all wrong)": wrong,
               "crown pixels called vegetation": in_crowns}
    lines = [f"{n:<12s} {100 * v:5.1f} % of the scene" for n, v in share.items()]
    lines.append(f"{len(boxes)} DeepForest tree crowns: {100 * in_crowns:.1f} % of their pixels called vegetation")
    lines.append(f"building + road + water (the scene has none): {100 * wrong:.1f} %")
    caption = (f"Reference: an open pine forest (NEON OSBS, Florida) with no building, road or water, and "
               f"{len(boxes)} tree crowns marked by DeepForest. Of the map, {100 * wrong:.0f} % is building, road "
               f"or water (all wrong); {100 * in_crowns:.0f} % of the crown pixels are vegetation.")
    return {"reference": "NEON OSBS_029 tree crowns (DeepForest)", "figures": figures, "lines": lines,
            "caption": caption}


def _atlanta(src: Path, class_path: Path, names: Sequence[str]) -> dict:
    ds = gdal.Open(str(class_path))
    if ds is None:
        raise OSError(f"cannot open {class_path}")
    classes = ds.GetRasterBand(1).ReadAsArray()  # read once, from the dataset whose grid is rasterised onto
    mem = gdal.GetDriverByName("MEM").Create("", ds.RasterXSize, ds.RasterYSize, 1, gdal.GDT_Byte)
    mem.SetGeoTransform(ds.GetGeoTransform())
    mem.SetProjection(ds.GetProjection())
    vec = gdal.OpenEx(str(src.with_name("geotiff_labels.geojson")))
    layer = vec.GetLayer(0)
    gdal.RasterizeLayer(mem, [1], layer, burn_values=[1])
    truth = mem.GetRasterBand(1).ReadAsArray().astype(bool)
    valid = classes != NODATA
    pred = (classes == (list(names).index("building") if "building" in names else -1)) & valid
    truth &= valid
    tp, fp, fn = int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())
    iou = tp / (tp + fp + fn) if tp + fp + fn else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    n = layer.GetFeatureCount()
    figures = {"building IoU": iou, "building precision": precision, "building recall": recall,
               "share building (reference)": float(truth.sum() / max(1, valid.sum())),
               "share building (map)": float(pred.sum() / max(1, valid.sum()))}
    lines = [f"{n} SpaceNet building footprints: building IoU {iou:.3f}, precision {precision:.3f}, "
             f"recall {recall:.3f}",
             f"building: {100 * figures['share building (map)']:.1f} % of the map, "
             f"{100 * figures['share building (reference)']:.1f} % in the reference"]
    caption = (f"Reference: {n} SpaceNet building footprints. Building IoU {iou:.2f} (precision {precision:.2f}: "
               f"of the pixels called building, that share is one; recall {recall:.2f}: that share of the "
               f"footprints is found).")
    return {"reference": "SpaceNet Atlanta building footprints", "figures": figures, "lines": lines,
            "caption": caption}


def check_scene(src, class_raster, names: Sequence[str]) -> Optional[dict]:
    """The reference check of a shared demo scene (module docstring), or None when the scene has none.

    Args:
        src: the input raster's path. class_raster: the class raster on its grid (uint8, 255 nodata).
        names: the model's class names in id order.

    Raises:
        OSError: the class raster cannot be opened.
    """
    src, class_raster = Path(src), Path(class_raster)
    if src.name == "OSBS_029.tif" and src.with_suffix(".csv").is_file():
        return _osbs(src, _read(class_raster), names)
    if src.name == "sample_geotiff.tif" and src.with_name("geotiff_labels.geojson").is_file():
        return _atlanta(src, class_raster, names)
    return None
