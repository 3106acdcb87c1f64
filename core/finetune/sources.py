"""Training data from what analysts have: rasters with class rasters, rasters with polygon layers,
folders of image/mask pairs — all turned into in-memory :class:`TrainingImage` samples.

Every loader returns the image on the model's value range (0..255, the same band selection and value
scaling as the segmentation engine: :func:`core.geo.raster.select_bands`, :func:`core.geo.raster.compute_scaling`,
:class:`core.geo.raster.StripReader`) and the label as class ids 0..K-1 of a :class:`ClassTable`, with
255 (:data:`IGNORE`) for "do not learn here": the label's nodata, unlabelled pixels, values the class
table lists as ignored, pixels outside the label's extent and pixels that are nodata in the image.

Sources of labels:

* a class raster on the same grid as the image or on ANY grid (another CRS, pixel size or extent): it
  is resampled with nearest neighbour onto the image's grid (``gdal.Warp``); :func:`load_raster_pair`.
* a polygon layer with a class field: rasterised onto the image's grid in the image's CRS
  (``gdal.Rasterize``), the polygons reprojected with OGR when their CRS differs;
  :func:`load_polygon_pair`.
* folders of image/mask pairs, with colour-coded (RGB or palette) or indexed masks;
  :func:`load_image_mask_folder`, with ready-made tables and loaders for the Dubai aerial set
  (:func:`dubai_class_table`, :func:`load_dubai`), LoveDA and ISPRS Potsdam/Vaihingen
  (:func:`load_mmseg_folder`).

The ``group`` of a sample is its spatial unit for the validation split (the tile or source raster):
:func:`split_by_group` never puts pixels of one group on both sides.

All errors are :class:`core.errors.InputError` with a message naming the file, band, field or value
at fault.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union
import numpy as np
from osgeo import gdal, ogr, osr
from core.errors import InputError
from core.geo.failures import reading
from core.geo.raster import StripReader, compute_scaling, open_raster, select_bands
gdal.UseExceptions()
ogr.UseExceptions()
osr.UseExceptions()
from core.classtable import ClassTable, IGNORE, value_key, dubai_class_table, load_class_table
from core.geo.vector import GeometryRepairs, reprojected
from core.geo.vector import open_layer, traditional
from core.files import REPO_ROOT
from core.geo.vector import find_field
MODEL_BANDS = ("red", "green", "blue")
DEFAULT_SCALING = {"low_percentile": 2.0, "high_percentile": 98.0, "sample_size": 1024}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".jp2", ".bmp")
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


# -- samples ---------------------------------------------------------------------------------------
@dataclass
class TrainingImage:
    """One training image with its label, in memory.

    Attributes:
        name: a readable, unique name (e.g. ``tile_1/image_part_003``).
        image: uint8 or float32 (3, H, W) on the model's value range 0..255 (uint8 when the source is
            uint8 and used as it is, float32 after a percentile stretch). Not normalised by mean/std.
        label: uint8 (H, W): class ids 0..K-1, 255 = ignore.
        group: the spatial unit for the validation split (tile or source raster name).
        source: provenance (file paths, grid, notes on resampling, ignored pixels...).
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    group: str
    source: Dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> Tuple[int, int]:
        return int(self.label.shape[0]), int(self.label.shape[1])


# -- images ------------------------------------------------------------------------------------------
def _read_image(ds: gdal.Dataset, path, bands: Optional[Sequence[int]], model_bands: Sequence[str],
                scaling_rule: Optional[dict], value_range: Sequence[float]) -> Tuple[np.ndarray, Optional[np.ndarray], dict]:
    """(image (n, H, W) uint8-or-float32, valid bool (H, W) or None, info)."""
    band_list = select_bands(ds, path, bands, model_bands)
    scaling = compute_scaling(ds, band_list, scaling_rule or DEFAULT_SCALING, value_range, name=path)
    reader = StripReader(ds, band_list, scaling, name=path)
    data, valid = reader.read(0, ds.RasterYSize)
    if scaling.identity and all(ds.GetRasterBand(b).DataType == gdal.GDT_Byte for b in band_list):
        data = data.astype(np.uint8)
    else:
        data = np.ascontiguousarray(data, dtype=np.float32)
    info = {"bands": band_list, "scaling": scaling.notes}
    return data, valid, info


def _has_crs(ds: gdal.Dataset) -> bool:
    return ds.GetSpatialRef() is not None


def _same_grid(a: gdal.Dataset, b: gdal.Dataset) -> bool:
    if (a.RasterXSize, a.RasterYSize) != (b.RasterXSize, b.RasterYSize):
        return False
    ga, gb = a.GetGeoTransform(), b.GetGeoTransform()
    px = max(abs(ga[1]), abs(ga[5]), 1e-12)
    if any(abs(x - y) > 1e-6 * px for x, y in zip(ga, gb)):
        return False
    return bool(a.GetSpatialRef().IsSame(b.GetSpatialRef()))


def _expand_palette(idx: np.ndarray, ct: gdal.ColorTable) -> np.ndarray:
    lut = np.zeros((256 if idx.dtype == np.uint8 else 65536, 3), np.uint8)
    for i in range(min(ct.GetCount(), len(lut))):
        lut[i] = ct.GetColorEntry(i)[:3]
    return np.moveaxis(lut[idx], -1, 0)


def _label_from_raster(label_ds: gdal.Dataset, label_path, like: gdal.Dataset, like_path, classes: ClassTable,
                       label_band: int) -> Tuple[np.ndarray, dict]:
    """Class ids uint8 (H, W) on ``like``'s grid from a class raster (colour-coded or values)."""
    colour = classes.kind == "rgb"
    src_bands, ct = _label_bands(label_ds, label_path, colour, label_band)
    nodata = label_ds.GetRasterBand(src_bands[0]).GetNoDataValue()
    info: Dict[str, Any] = {"label": str(label_path), "label_bands": src_bands, "label_nodata": nodata}
    arrays, covered = _label_on_grid(label_ds, label_path, like, like_path, src_bands, info)
    if colour:
        ids = _ids_from_colours(arrays, covered, ct, nodata, classes, label_path)
    else:
        arr = arrays[0]
        if covered is not None:
            ids = np.full(arr.shape, IGNORE, np.uint8)
            ids[covered] = classes.map_values(arr[covered], nodata, where=f"{label_path} band {src_bands[0]}")
        else:
            ids = classes.map_values(arr, nodata, where=f"{label_path} band {src_bands[0]}")
    return ids, info


def _label_bands(label_ds: gdal.Dataset, label_path, colour: bool, label_band: int):
    """``(bands to read, colour table or None)`` of a class raster: RGB bands or a palette band for a
    colour-coded table, else ``label_band``. Raises InputError: the raster does not fit the table."""
    n = label_ds.RasterCount
    first = label_ds.GetRasterBand(1)
    ct = first.GetColorTable() if n == 1 else None
    if colour:
        if n >= 3:
            src_bands = [1, 2, 3]
        elif ct is not None:
            src_bands = [1]
        else:
            raise InputError(f"{label_path}: the class table gives mask colours (#RRGGBB) but the label raster has "
                             f"{n} band{'s' if n != 1 else ''} and no colour table")
    else:
        if label_band < 1 or label_band > n:
            raise InputError(f"{label_path}: label band {label_band} does not exist (the raster has {n} band"
                             f"{'s' if n != 1 else ''})")
        if n >= 3 and label_band == 1 and label_ds.GetRasterBand(1).GetColorInterpretation() == gdal.GCI_RedBand:
            raise InputError(f"{label_path}: the label raster is RGB (colour-coded) but the class table gives plain "
                             "values; give each class its mask colour as value \"#RRGGBB\"")
        src_bands = [label_band]
    return src_bands, ct


def _label_on_grid(label_ds: gdal.Dataset, label_path, like: gdal.Dataset, like_path, src_bands: List[int],
                   info: dict):
    """``(arrays, covered)``: the label's bands on ``like``'s grid — resampled (nearest) when both have a
    CRS and the grids differ (``covered``: bool (H, W), where the label has data), else read as they are
    (same size; ``covered`` None). Raises InputError: no overlap, or other sizes and no CRS."""
    W, H = like.RasterXSize, like.RasterYSize
    size_same = (label_ds.RasterXSize, label_ds.RasterYSize) == (W, H)
    if _has_crs(like) and _has_crs(label_ds) and not _same_grid(like, label_ds):
        # Resample onto the image's grid (nearest); outside the label's extent and its nodata → alpha 0.
        dtype = label_ds.GetRasterBand(src_bands[0]).DataType
        dst = gdal.GetDriverByName("MEM").Create("", W, H, len(src_bands) + 1, dtype)
        dst.SetGeoTransform(like.GetGeoTransform())
        dst.SetSpatialRef(like.GetSpatialRef())
        try:
            # The label's bands as a VRT (GDAL 3.6's Warp has no source band selection); kept referenced.
            src = gdal.Translate("", label_ds, format="VRT", bandList=src_bands)
            gdal.Warp(dst, src, options=gdal.WarpOptions(resampleAlg="near", dstAlpha=True, multithread=False))
            src = None
        except RuntimeError as exc:
            raise InputError(f"{label_path}: cannot resample the label onto the grid of {like_path} ({exc})") from exc
        arrays = [dst.GetRasterBand(i + 1).ReadAsArray() for i in range(len(src_bands))]
        covered = dst.GetRasterBand(len(src_bands) + 1).ReadAsArray() > 0
        dst = None
        info["resampled"] = "nearest neighbour onto the image grid (gdal.Warp)"
        if not covered.any():
            raise InputError(f"{label_path}: the label raster does not overlap {like_path} "
                             "(after reprojecting it to the image's CRS)")
    elif size_same:
        with reading(label_path, "label raster"):
            arrays = [label_ds.GetRasterBand(b).ReadAsArray() for b in src_bands]
        covered = None
        if not (_has_crs(like) and _has_crs(label_ds)):
            info["aligned"] = "pixel to pixel (same size; no CRS on one or both files)"
    else:
        raise InputError(f"{label_path} ({label_ds.RasterXSize}x{label_ds.RasterYSize} px) and {like_path} "
                         f"({W}x{H} px): mismatched sizes and no CRS to align them"
                         f" ({'neither file has' if not (_has_crs(like) or _has_crs(label_ds)) else 'one file has no'} "
                         "coordinate reference system)")
    return arrays, covered


def _ids_from_colours(arrays, covered, ct, nodata, classes: ClassTable, label_path) -> np.ndarray:
    """Class ids uint8 (H, W) of a colour-coded label (RGB bands, or one palette band with ``ct``);
    nodata and uncovered pixels → 255. Raises InputError: a colour not in the class table."""
    if len(arrays) == 1:
        idx = arrays[0]
        rgb = _expand_palette(idx, ct)
        nd_mask = (idx == nodata) if nodata is not None else None
    else:
        rgb = np.stack(arrays).astype(np.uint8)
        nd_mask = None
        if nodata is not None:
            nd_mask = np.all(np.stack(arrays) == nodata, axis=0)
    if nd_mask is not None or covered is not None:
        skip = np.zeros(rgb.shape[1:], bool) if nd_mask is None else nd_mask
        if covered is not None:
            skip |= ~covered
        # Map only labelled pixels (nodata colours may be outside the table).
        ids = np.full(rgb.shape[1:], IGNORE, np.uint8)
        keep = ~skip
        ids[keep] = classes.map_rgb(rgb[:, keep][:, :, None], f"{label_path}", channels_first=True)[:, 0]
        return ids
    return classes.map_rgb(rgb, f"{label_path}", channels_first=True)


def _finish(name: str, image: np.ndarray, valid: Optional[np.ndarray], label: np.ndarray, group: str,
            info: dict) -> TrainingImage:
    if valid is not None:
        nodata_px = int((~valid).sum())
        if nodata_px:
            label = label.copy()
            label[~valid] = IGNORE
            info["image_nodata_px"] = nodata_px
    info["ignored_px"] = int((label == IGNORE).sum())
    return TrainingImage(name=name, image=image, label=np.ascontiguousarray(label, dtype=np.uint8), group=group,
                         source=info)


def load_raster_pair(raster, label_raster, classes, *, bands: Optional[Sequence[int]] = None, label_band: int = 1,
                     model_bands: Sequence[str] = MODEL_BANDS, scaling_rule: Optional[dict] = None,
                     value_range: Sequence[float] = (0, 255), name: Optional[str] = None,
                     group: Optional[str] = None) -> TrainingImage:
    """A (raster, class raster) pair as a :class:`TrainingImage`.

    The class raster may be on the raster's grid or on any other grid: when both files have a CRS and
    the grids differ, it is resampled with nearest neighbour onto the raster's grid (gdal.Warp to the
    raster's CRS, geotransform and size). Pixels outside the label's extent, the label's nodata, the
    table's ignored values and the raster's nodata pixels → 255. Files without a CRS are aligned pixel
    to pixel, which needs equal sizes. A colour-coded class table (values ``#RRGGBB``) reads an RGB
    label (bands 1-3) or a palette band (expanded with its colour table).

    Args:
        raster: the image (any GDAL raster); ``bands``: 1-based bands in the model's band order
            (:func:`core.geo.raster.select_bands`); non-uint8 data is percentile-stretched to 0..255
            (:func:`core.geo.raster.compute_scaling`).
        label_raster: the class raster; ``label_band``: its band of class values.
        classes: a :class:`ClassTable` or anything :func:`load_class_table` accepts.
        name / group: default the raster's file stem.

    Returns:
        TrainingImage: image (3, H, W) uint8/float32 0..255, label uint8 (H, W), on the raster's grid.

    Raises:
        InputError: unreadable files, a missing band, "mismatched sizes and no CRS to align them",
            label values not in the class table (listed with pixel counts), no overlap.
    """
    classes = load_class_table(classes)
    ds = open_raster(raster)
    lds = open_raster(label_raster)
    image, valid, info = _read_image(ds, raster, bands, model_bands, scaling_rule, value_range)
    label, linfo = _label_from_raster(lds, label_raster, ds, raster, classes, label_band)
    info.update(linfo)
    info["raster"] = str(raster)
    stem = Path(str(raster)).stem
    return _finish(name or stem, image, valid, label, group or stem, info)


def rasterize_polygons(vector, field_name: str, classes, like: gdal.Dataset, like_path="raster", *,
                       layer: Optional[Union[str, int]] = None, background: Optional[Union[str, int]] = None,
                       all_touched: bool = False) -> Tuple[np.ndarray, dict]:
    """Rasterise a polygon layer's class field onto the grid of ``like`` (a GDAL dataset).

    Polygons are reprojected to ``like``'s CRS with OGR when their CRS differs (a layer without CRS is
    taken to be in the raster's CRS). Each feature's field value is mapped through the class table; a
    feature whose value is null is skipped; ignored values burn 255. Where polygons overlap the later
    feature wins. Pixels covered by no polygon get ``background`` (a class name or id) or 255.

    Returns:
        ``(label uint8 (H, W), info)``.

    Raises:
        InputError: a missing file or layer, an empty layer, a missing field (the message lists the
            layer's fields), field values not in the class table (listed with feature counts), or
            polygons that do not overlap the raster.
    """
    classes = load_class_table(classes)
    vds, lyr = open_layer(vector, layer)
    field_name = find_field(lyr, field_name, vector)
    n_features = lyr.GetFeatureCount()
    if n_features == 0:
        raise InputError(f"{vector}: layer {lyr.GetName()!r} is empty (no features)")
    bg = IGNORE if background is None else classes.index(background)
    dst_srs = traditional(like.GetSpatialRef())
    src_srs = traditional(lyr.GetSpatialRef())
    ct = None
    info: Dict[str, Any] = {"polygons": str(vector), "layer": lyr.GetName(), "field": field_name,
                            "features": n_features, "background": None if background is None else classes.names[bg]}
    if src_srs is not None and dst_srs is not None and not src_srs.IsSame(dst_srs):
        ct = osr.CoordinateTransformation(src_srs, dst_srs)
        info["reprojected"] = "polygons reprojected to the raster's CRS (OGR)"
    mem, mlyr = _class_id_layer(lyr, field_name, classes, ct, dst_srs, vector, info)  # mem owns mlyr: keep it
    label = _burn(mlyr, like, bg, all_touched)
    burnt = int((label != bg).sum()) if bg != IGNORE else int((label != IGNORE).sum())
    if burnt == 0:
        raise InputError(_no_overlap_message(mlyr, lyr, like, vector, like_path))
    info["labelled_px"] = int((label != IGNORE).sum())
    vds = None
    return label, info


def _class_id_layer(lyr, field_name: str, classes: ClassTable, ct, dst_srs, vector, info: dict):
    """``(datasource, layer)`` in memory: the features of ``lyr`` with a geometry and a class, reprojected
    by ``ct`` (or not, when None), with their class id in field ``srmf_id``; features without geometry
    or with a null class are counted in ``info``. Keep the datasource referenced while the layer is used.
    Raises InputError: field values not in the class table (listed with feature counts)."""
    mem = ogr.GetDriverByName("Memory").CreateDataSource("srmf_labels")
    mlyr = mem.CreateLayer("labels", srs=dst_srs, geom_type=ogr.wkbUnknown)
    mlyr.CreateField(ogr.FieldDefn("srmf_id", ogr.OFTInteger))
    mdefn = mlyr.GetLayerDefn()
    unknown: Dict[str, int] = {}
    nulls = 0
    no_geom = 0
    repairs = GeometryRepairs(vector)
    lyr.ResetReading()
    with reading(vector, "polygon layer"):
        for feat in lyr:
            geom = feat.GetGeometryRef()
            if geom is None or geom.IsEmpty():
                no_geom += 1
                continue
            idx = feat.GetFieldIndex(field_name)
            if not feat.IsFieldSetAndNotNull(idx):
                nulls += 1
                continue
            value = feat.GetField(idx)
            cid = classes.lookup(value)
            if cid is None:
                k = value_key(value)
                unknown[k] = unknown.get(k, 0) + 1
                continue
            geom = repairs.fix(geom, feat.GetFID())
            if geom is None:
                continue
            g = reprojected(geom, ct, vector, feat.GetFID(), "the raster's CRS")
            out = ogr.Feature(mdefn)
            out.SetField("srmf_id", int(cid))
            out.SetGeometry(g)
            mlyr.CreateFeature(out)
    repairs.check()
    if repairs.summary():
        info["invalid_geometries"] = repairs.summary()
        info["warnings"] = info.get("warnings", []) + [repairs.message()]
    if unknown:
        msg = classes._unexpected_message(f"{vector} field {field_name!r}", unknown, "value")
        raise InputError(msg.replace(" px)", " features)"))
    if nulls:
        info["features_with_null_class"] = nulls
    if no_geom:
        info["features_without_geometry"] = no_geom
    return mem, mlyr


def _burn(mlyr, like: gdal.Dataset, bg: int, all_touched: bool) -> np.ndarray:
    """uint8 (H, W) on ``like``'s grid: ``bg``, then each feature's ``srmf_id`` (later features win)."""
    W, H = like.RasterXSize, like.RasterYSize
    dst = gdal.GetDriverByName("MEM").Create("", W, H, 1, gdal.GDT_Byte)
    dst.SetGeoTransform(like.GetGeoTransform())
    if like.GetSpatialRef() is not None:
        dst.SetSpatialRef(like.GetSpatialRef())
    band = dst.GetRasterBand(1)
    band.Fill(bg)
    if mlyr.GetFeatureCount():
        gdal.RasterizeLayer(dst, [1], mlyr, options=[f"ATTRIBUTE=srmf_id",
                                                    f"ALL_TOUCHED={'TRUE' if all_touched else 'FALSE'}"])
    label = band.ReadAsArray()
    band = None
    dst = None
    return label


def _no_overlap_message(mlyr, lyr, like: gdal.Dataset, vector, like_path) -> str:
    """Why no polygon was burnt: the polygons' and the raster's extents, in the raster's CRS."""
    W, H = like.RasterXSize, like.RasterYSize
    ext = mlyr.GetExtent() if mlyr.GetFeatureCount() else None
    gt = like.GetGeoTransform()
    rext = (gt[0], gt[0] + gt[1] * W, gt[3] + gt[5] * H, gt[3])
    return (f"{vector}: none of the {mlyr.GetFeatureCount()} polygon(s) of layer {lyr.GetName()!r} "
            f"falls on {like_path} (polygon extent {ext} in the raster's CRS, raster extent "
            f"{tuple(round(v, 6) for v in rext)}); check the layer's CRS")


def load_polygon_pair(raster, vector, field_name: str, classes, *, layer: Optional[Union[str, int]] = None,
                      background: Optional[Union[str, int]] = None, all_touched: bool = False,
                      bands: Optional[Sequence[int]] = None, model_bands: Sequence[str] = MODEL_BANDS,
                      scaling_rule: Optional[dict] = None, value_range: Sequence[float] = (0, 255),
                      name: Optional[str] = None, group: Optional[str] = None) -> TrainingImage:
    """A (raster, polygon layer + class field) pair as a :class:`TrainingImage`.

    The polygons are rasterised onto the raster's grid in the raster's CRS
    (:func:`rasterize_polygons`: gdal.RasterizeLayer, polygons reprojected with OGR when their CRS
    differs). Unlabelled pixels → 255, or the ``background`` class (name or id) when given.

    Returns:
        TrainingImage: image (3, H, W) uint8/float32 0..255, label uint8 (H, W).

    Raises:
        InputError: see :func:`rasterize_polygons` and :func:`load_raster_pair`.
    """
    classes = load_class_table(classes)
    ds = open_raster(raster)
    label, linfo = rasterize_polygons(vector, field_name, classes, ds, raster, layer=layer, background=background,
                                      all_touched=all_touched)
    image, valid, info = _read_image(ds, raster, bands, model_bands, scaling_rule, value_range)
    info.update(linfo)
    info["raster"] = str(raster)
    stem = Path(str(raster)).stem
    return _finish(name or stem, image, valid, label, group or stem, info)


# -- folders -----------------------------------------------------------------------------------------
def _pairs(images_dir: Path, masks_dir: Path) -> List[Tuple[Path, Path]]:
    if not images_dir.is_dir():
        raise InputError(f"Image folder not found: {images_dir}")
    if not masks_dir.is_dir():
        raise InputError(f"Mask folder not found: {masks_dir}")
    masks: Dict[str, Path] = {}
    for m in sorted(masks_dir.iterdir()):
        if m.suffix.lower() in IMAGE_EXTENSIONS:
            masks.setdefault(m.stem, m)
    out = []
    images = [p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise InputError(f"{images_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise InputError(f"{masks_dir}: no mask for image(s) {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''} of {images_dir} (masks are matched by file stem)")
    for p in images:
        out.append((p, masks[p.stem]))
    return out


def load_image_mask_folder(images_dir, masks_dir, classes, *, group: Optional[str] = None,
                           exclude: Iterable[str] = (), bands: Optional[Sequence[int]] = None,
                           label_band: int = 1, name_prefix: Optional[str] = None,
                           group_per_image: bool = False, model_bands: Sequence[str] = MODEL_BANDS) -> List[TrainingImage]:
    """Image/mask pairs from two folders, matched by file stem (``a.jpg`` ↔ ``a.png``).

    Masks are colour-coded (RGB, or palette-mode PNG decoded through its own colour table — never the
    raw palette index) when the class table's values are ``#RRGGBB`` colours, else indexed (band values).
    Georeferenced pairs on different grids are resampled as in :func:`load_raster_pair`.

    Args:
        group: the validation-split group of every pair (default: the parent folder's name, e.g.
            ``tile_1``); ``group_per_image``: one group per image instead (independent scenes).
        exclude: file stems to leave out (e.g. a known-bad label).

    Returns:
        One :class:`TrainingImage` per pair, named ``{name_prefix}/{stem}``.

    Raises:
        InputError: a missing folder, an image without mask, unknown mask colours/values, bad sizes.
    """
    classes = load_class_table(classes)
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    parent = images_dir.resolve().parent.name
    prefix = parent if name_prefix is None else name_prefix
    excl = set(exclude)
    out = []
    for img, mask in _pairs(images_dir, masks_dir):
        if img.stem in excl:
            continue
        nm = f"{prefix}/{img.stem}" if prefix else img.stem
        grp = nm if group_per_image else (group or parent)
        sample = load_raster_pair(img, mask, classes, bands=bands, label_band=label_band, name=nm, group=grp,
                                  model_bands=model_bands)
        out.append(sample)
    return out


DUBAI_TILES = ("tile_1", "tile_2", "tile_3", "tile_5", "tile_6", "tile_7", "tile_8")
DUBAI_BAD_LABELS = ("tile_7/image_part_008",)
"""Known label defects (SOURCES.md): tile_7/image_part_008 is 100 % "land" although it shows a road
and buildings."""


def dubai_root() -> Path:
    """The Dubai set's folder: ``$SRMF_DUBAI_DIR`` or ``../shared/data/dubai_hitl_aerial``."""
    return Path(os.environ.get("SRMF_DUBAI_DIR", SHARED_DATA / "dubai_hitl_aerial"))


def load_dubai(tiles: Optional[Sequence[str]] = None, root=None, *, exclude_bad: bool = False,
               parts: Optional[Sequence[int]] = None) -> List[TrainingImage]:
    """The Dubai aerial set (Humans in the Loop / MBRSC): one TrainingImage per image part, group = tile.

    Args:
        tiles: tile folder names (``"tile_1"`` or ``1``); default all present. root: the set's folder
            (default :func:`dubai_root`). exclude_bad: leave out :data:`DUBAI_BAD_LABELS`.
            parts: part numbers 1..9 to load (default all).

    Returns:
        Samples named ``tile_N/image_part_00M``: image uint8 (3, H, W), label uint8 (H, W) with
        building 0, land 1, road 2, vegetation 3, water 4, 255 for Unlabeled and black.

    Raises:
        InputError: a missing tile folder.
    """
    root = Path(root) if root is not None else dubai_root()
    if tiles is None:
        tiles = [t for t in DUBAI_TILES if (root / t).is_dir()]
        if not tiles:
            raise InputError(f"No Dubai tile folders (tile_N/images, tile_N/masks) in {root}")
    table = dubai_class_table()
    out = []
    for t in tiles:
        t = f"tile_{t}" if isinstance(t, int) or str(t).isdigit() else str(t)
        d = root / t
        if not d.is_dir():
            raise InputError(f"Dubai tile folder not found: {d}")
        excl = set()
        if exclude_bad:
            excl |= {b.split("/")[1] for b in DUBAI_BAD_LABELS if b.split("/")[0] == t}
        if parts is not None:
            keep = {f"image_part_{int(p):03d}" for p in parts}
            excl |= {p.stem for p in (d / "images").iterdir()} - keep
        out.extend(load_image_mask_folder(d / "images", d / "masks", table, group=t, exclude=excl, name_prefix=t))
    return out


def load_mmseg_folder(root, classes, *, img_dir: str = "img_dir", ann_dir: str = "ann_dir",
                      group_per_image: bool = True) -> List[TrainingImage]:
    """An mmsegmentation-style folder (``root/img_dir``, ``root/ann_dir``) — e.g. the LoveDA, Potsdam and
    Vaihingen tiles of ``../shared/data/srmf_mmseg_testdata`` — with indexed masks.

    Use :func:`loveda_class_table` or :func:`isprs_class_table` for ``classes``. Each image is its own
    group (independent scenes) unless ``group_per_image`` is false (one group = the folder).
    """
    root = Path(root)
    return load_image_mask_folder(root / img_dir, root / ann_dir, classes, name_prefix=root.name,
                                  group_per_image=group_per_image, group=root.name)


# -- several sources ---------------------------------------------------------------------------------
def load_sources(sources: Sequence[dict], classes, *, bands: Optional[Sequence[int]] = None,
                 model_bands: Sequence[str] = MODEL_BANDS) -> List[TrainingImage]:
    """Load a list of source descriptions (what a ``finetune`` job file lists), in order.

    Each item is one of:
      ``{"raster": R, "labels": L [, "label_band": 1]}`` — a class raster;
      ``{"raster": R, "polygons": V, "field": F [, "layer": ..., "background": ..., "all_touched": false]}``;
      ``{"images": DIR, "masks": DIR [, "group": G, "exclude": [...]]}`` — a folder of pairs;
      ``{"dubai": [tiles] | true}`` — the Dubai set.
    Optional on raster items: ``"bands"`` (default ``bands``), ``"name"``, ``"group"``. ``model_bands``: the
    model's input bands by name (:func:`core.geo.raster.select_bands` finds them in each raster).

    Raises:
        InputError: an item of none of these forms (named by its position), or any loader's error.
    """
    classes = load_class_table(classes)
    out: List[TrainingImage] = []
    for i, s in enumerate(sources):
        if not isinstance(s, dict):
            raise InputError(f"training source {i + 1}: expected an object, got {s!r}")
        common = {k: s[k] for k in ("bands", "name", "group") if k in s}
        if "bands" not in common and bands is not None:
            common["bands"] = list(bands)
        common["model_bands"] = tuple(model_bands)
        if "raster" in s and "labels" in s:
            out.append(load_raster_pair(s["raster"], s["labels"], classes, label_band=int(s.get("label_band", 1)),
                                        **common))
        elif "raster" in s and "polygons" in s:
            if "field" not in s:
                raise InputError(f"training source {i + 1} ({s['polygons']}): polygons need a class \"field\"")
            out.append(load_polygon_pair(s["raster"], s["polygons"], s["field"], classes, layer=s.get("layer"),
                                         background=s.get("background"), all_touched=bool(s.get("all_touched", False)),
                                         **common))
        elif "images" in s and "masks" in s:
            out.extend(load_image_mask_folder(s["images"], s["masks"], classes, group=s.get("group"),
                                              exclude=s.get("exclude", ()), bands=common.get("bands"),
                                              model_bands=common["model_bands"]))
        elif "dubai" in s:
            if tuple(model_bands) != MODEL_BANDS:
                raise InputError(f"training source {i + 1}: the Dubai tiles are RGB; the model reads "
                                 f"{', '.join(model_bands)}")
            tiles = None if s["dubai"] is True else s["dubai"]
            out.extend(load_dubai(tiles, root=s.get("root")))
        else:
            raise InputError(f"training source {i + 1}: give raster+labels, raster+polygons+field, images+masks "
                             f"or dubai; got keys {', '.join(sorted(s))}")
    names = [t.name for t in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise InputError(f"training sources: names appear twice: {', '.join(sorted(dup))}; give each a \"name\"")
    return out


# -- statistics and split ----------------------------------------------------------------------------
def class_pixel_counts(samples: Sequence[Union[TrainingImage, np.ndarray]], num_classes: int) -> np.ndarray:
    """Labelled pixels per class over ``samples``: int64 (num_classes,) (255 not counted)."""
    counts = np.zeros(num_classes, np.int64)
    for s in samples:
        lab = s.label if isinstance(s, TrainingImage) else np.asarray(s)
        counts += np.bincount(lab.ravel(), minlength=256)[:num_classes]
    return counts


def split_by_group(samples: Sequence[TrainingImage], val_groups: Optional[Sequence[str]] = None,
                   val_fraction: float = 0.2, seed: int = 0) -> Tuple[List[TrainingImage], List[TrainingImage]]:
    """Split samples into (train, val) by whole groups — never pixels of one tile on both sides.

    ``val_groups`` names the validation groups; otherwise whole groups are drawn (seeded) until they
    hold at least ``val_fraction`` of the labelled pixels. With one group only, val is empty.

    Raises:
        InputError: a named validation group that does not exist, or one that takes every sample.
    """
    groups: Dict[str, List[TrainingImage]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    if val_groups is not None:
        missing = [g for g in val_groups if g not in groups]
        if missing:
            raise InputError(f"validation group(s) {', '.join(missing)} not in the training data "
                             f"(groups: {', '.join(sorted(groups))})")
        chosen = set(val_groups)
        if chosen == set(groups):
            raise InputError("every group is in the validation set; nothing is left to train on")
    else:
        names = sorted(groups)
        if len(names) < 2:
            return list(samples), []
        rng = np.random.default_rng(seed)
        order = [names[i] for i in rng.permutation(len(names))]
        px = {g: sum(int((s.label != IGNORE).sum()) for s in groups[g]) for g in names}
        total = sum(px.values()) or 1
        chosen, acc = set(), 0
        for g in order[:-1]:
            if acc / total >= val_fraction:
                break
            chosen.add(g)
            acc += px[g]
    train = [s for s in samples if s.group not in chosen]
    val = [s for s in samples if s.group in chosen]
    return train, val
