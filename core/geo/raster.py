"""Raster input and output with GDAL: band selection, value scaling, nodata, class-raster writing.

Reading: strips of rows (all columns, the selected bands) as float32, with a validity mask built from
the raster's nodata values or mask bands. Writing: a tiled, DEFLATE-compressed GeoTIFF with the input's
CRS and geotransform, written to a temporary file beside the target and renamed when complete.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple
import numpy as np
from osgeo import gdal
from core.errors import InputError
from core.files import check_writable_folder, discard, partial_path, publish
from core.geo.failures import checked_close, discarding, reading, writing
gdal.UseExceptions()

NODATA_CLASS = 255
PALETTE_EXPANDED = "SRMF_PALETTE_EXPANDED"
"""Metadata item on the virtual RGB dataset :func:`expand_palette` returns (its pixels are a colour table's)."""
_COLOUR_INTERP = {"red": gdal.GCI_RedBand, "green": gdal.GCI_GreenBand, "blue": gdal.GCI_BlueBand}


def open_raster(path) -> gdal.Dataset:
    """Open a raster for reading.

    Raises:
        InputError: the file does not exist, or GDAL cannot read it as a raster.
    """
    p = str(path)
    if not p.startswith("/vsi") and not os.path.exists(p):
        raise InputError(f"Input raster not found: {p}")
    try:
        ds = gdal.Open(p, gdal.GA_ReadOnly)
    except RuntimeError as exc:
        raise InputError(f"{p} is not a raster GDAL can read ({exc})") from exc
    if ds is None or ds.RasterCount < 1:
        raise InputError(f"{p} is not a raster GDAL can read (no raster bands)")
    return ds


def open_image(path, log=None) -> gdal.Dataset:
    """Open an image to segment or search (:func:`open_raster`), with its pixel values made what the model
    reads: a 1-band paletted raster (colour-table indices, GCI_PaletteIndex) is expanded through its colour
    table to RGB (GDAL's ``rgbExpand``, a virtual dataset: no copy), and ``log(text, level)`` says so —
    palette indices are category codes, not grey levels (issue 13).

    Raises:
        InputError: as :func:`open_raster`; a colour table that is not RGB (grey, CMYK or HLS palette).
    """
    return expand_palette(open_raster(path), path, log)


def expand_palette(ds: gdal.Dataset, path, log=None) -> gdal.Dataset:
    """``ds`` itself, or — a 1-band paletted raster — a virtual RGB(A) dataset through its colour table
    (see :func:`open_image`). Raises InputError: a colour table that is not RGB."""
    band = ds.GetRasterBand(1)
    if ds.RasterCount != 1 or band.GetColorInterpretation() != gdal.GCI_PaletteIndex or band.GetColorTable() is None:
        return ds
    table = band.GetColorTable()
    if table.GetPaletteInterpretation() != gdal.GPI_RGB:
        kind = {gdal.GPI_Gray: "grey", gdal.GPI_CMYK: "CMYK", gdal.GPI_HLS: "HLS"}.get(table.GetPaletteInterpretation(), "?")
        raise InputError(f"{path}: band 1 holds palette indices with a {kind} colour table, not RGB; convert it to "
                         "RGB first (e.g. gdal_translate -expand rgb)")
    expanded = gdal.Translate("", ds, format="VRT", rgbExpand="rgba" if _palette_has_alpha(table) else "rgb")
    expanded.SetMetadataItem(PALETTE_EXPANDED, "YES")  # resampling must not average its indices
    if log:
        log(f"{path}: band 1 holds palette indices ({table.GetCount()} colours); expanded through its colour "
            "table to red, green, blue", "warning")
    return expanded


def _palette_has_alpha(table) -> bool:
    return any(table.GetColorEntry(i)[3] < 255 for i in range(table.GetCount()))


def parse_bands(text: Optional[str]) -> Optional[List[int]]:
    """Parse ``--bands`` ("1,2,3", 1-based). Raises InputError on a malformed list."""
    if text is None or str(text).strip() == "":
        return None
    try:
        bands = [int(b) for b in str(text).replace(" ", "").split(",") if b != ""]
    except ValueError as exc:
        raise InputError(f"--bands must be a comma-separated list of 1-based band numbers, got {text!r}") from exc
    if not bands:
        raise InputError(f"--bands is empty: {text!r}")
    return bands


def select_bands(ds: gdal.Dataset, path, bands: Optional[Sequence[int]], model_bands: Sequence[str]) -> List[int]:
    """The 1-based raster bands that feed the model's input channels, in the model's band order.

    Rules: explicit ``bands`` are checked and used (one band is replicated to every channel); without
    them a 1-band raster is replicated, a raster whose colour interpretation names the model's bands
    (red, green, blue) is read in that order, otherwise bands 1..n are used.

    Raises:
        InputError: a band number outside 1..band count, a wrong number of bands, or a 2-band raster
            with no ``bands`` given.
    """
    n_in = len(model_bands)
    count = ds.RasterCount
    if bands is not None:
        for b in bands:
            if b < 1 or b > count:
                raise InputError(f"--bands: band {b} does not exist in {path} (it has {count} band"
                                 f"{'s' if count != 1 else ''})")
        if len(bands) == 1:
            return list(bands) * n_in
        if len(bands) != n_in:
            raise InputError(f"--bands: the model reads {n_in} bands ({', '.join(model_bands)}), "
                             f"got {len(bands)}: {','.join(map(str, bands))}")
        return list(bands)
    if count == 1:
        return [1] * n_in
    if count < n_in:
        raise InputError(f"{path} has {count} bands but the model reads {n_in} ({', '.join(model_bands)}); "
                         "choose them with --bands (one band is replicated)")
    interp = {ds.GetRasterBand(i).GetColorInterpretation(): i for i in range(1, count + 1)}
    wanted = [_COLOUR_INTERP.get(name.lower()) for name in model_bands]
    if all(w is not None and w in interp for w in wanted):
        return [interp[w] for w in wanted]
    if n_in > 3:  # a multispectral model: every band by its name, never by position
        return _bands_by_name(ds, path, model_bands)
    return list(range(1, n_in + 1))


def _bands_by_name(ds: gdal.Dataset, path, model_bands: Sequence[str]) -> List[int]:
    """The raster's band of each of the model's band names, by colour interpretation or description
    (:func:`core.model.bands.raster_band_name`). Raises InputError naming the bands not found."""
    from core.model.bands import canonical_band_name, raster_band_name

    names = {}
    for i in range(1, ds.RasterCount + 1):
        names.setdefault(raster_band_name(ds, i), i)
    wanted = [canonical_band_name(n) or n for n in model_bands]
    missing = [w for w in wanted if w not in names]
    if missing:
        seen = ", ".join(f"{i}: {raster_band_name(ds, i) or 'unnamed'}" for i in range(1, ds.RasterCount + 1))
        raise InputError(f"{path}: the model reads {len(wanted)} bands ({', '.join(wanted)}); the raster has no "
                         f"{' and no '.join(missing)} band by colour interpretation or description (its bands: {seen}). "
                         f"Give the raster's band for each with --bands (in the order {','.join(wanted)})")
    return [names[w] for w in wanted]


@dataclass
class BandScaling:
    """Linear map of raw band values onto the model's value range: ``(x - low) / (high - low)``.

    uint8 rasters map identically (low = 0, high = 255 onto 0..255).
    """

    low: np.ndarray  # float64 (n_bands,)
    high: np.ndarray  # float64 (n_bands,)
    out_low: float = 0.0
    out_high: float = 255.0
    identity: bool = True
    notes: List[str] = field(default_factory=list)

    def apply(self, data: np.ndarray) -> np.ndarray:
        """float32 (n_bands, rows, cols) raw → float32 in [out_low, out_high] (saturating)."""
        if self.identity:
            return data
        lo = self.low.astype(np.float32)[:, None, None]
        span = np.maximum(self.high - self.low, 1e-12).astype(np.float32)[:, None, None]
        out = (data - lo) / span * np.float32(self.out_high - self.out_low) + np.float32(self.out_low)
        return np.clip(out, self.out_low, self.out_high, out=out)


def compute_scaling(ds: gdal.Dataset, bands: Sequence[int], scaling_rule: dict,
                    value_range: Sequence[float], name=None) -> BandScaling:
    """The value scaling for the selected bands, following the model file's ``input.scaling`` rule.

    uint8 bands are used as they are when the model's range is 0..255. Other data types: the per-band
    ``low_percentile``..``high_percentile`` (default 2..98 %) of the valid pixels, computed once on a
    read decimated to at most ``sample_size`` pixels a side (GDAL uses the overviews when there are
    some), are mapped onto ``value_range``; values beyond saturate, and the share that does is reported
    in ``notes`` — never a silent clip.

    ``name``: the file, for messages (default: the dataset's description).

    Raises:
        InputError: a band has no valid pixel. ReadError: GDAL cannot read the pixels (a truncated file).
    """
    name = name or ds.GetDescription()
    out_lo, out_hi = float(value_range[0]), float(value_range[1])
    dtypes = {ds.GetRasterBand(b).DataType for b in bands}
    if dtypes == {gdal.GDT_Byte} and (out_lo, out_hi) == (0.0, 255.0):
        n = len(bands)
        return BandScaling(np.zeros(n), np.full(n, 255.0), out_lo, out_hi, True, [])
    lo_p = float(scaling_rule.get("low_percentile", 2.0))
    hi_p = float(scaling_rule.get("high_percentile", 98.0))
    side = int(scaling_rule.get("sample_size", 1024))
    w, h = ds.RasterXSize, ds.RasterYSize
    f = max(1.0, max(w, h) / side)
    bw, bh = max(1, int(round(w / f))), max(1, int(round(h / f)))
    lows, highs, notes = [], [], []
    cache = {}
    for b in bands:
        if b in cache:
            lows.append(cache[b][0]); highs.append(cache[b][1])
            continue
        band = ds.GetRasterBand(b)
        with reading(name):
            arr = band.ReadAsArray(0, 0, w, h, buf_xsize=bw, buf_ysize=bh).astype(np.float64)
            valid = _valid_mask_for_band(band, 0, 0, w, h, bw, bh, arr)
        vals = arr[valid & np.isfinite(arr)]
        if vals.size == 0:
            raise InputError(f"{name}: band {b} has no valid (non-nodata) pixel")
        lo, hi = np.percentile(vals, [lo_p, hi_p])
        if hi <= lo:
            hi = lo + 1.0
        below = float((vals < lo).mean() * 100.0)
        above = float((vals > hi).mean() * 100.0)
        dtype_name = gdal.GetDataTypeName(band.DataType)
        notes.append(f"band {b} ({dtype_name}): {lo_p:g}-{hi_p:g} % percentiles {lo:.6g}..{hi:.6g} mapped to "
                     f"{out_lo:g}..{out_hi:g}; {below:.1f} % of pixels saturate low, {above:.1f} % high")
        cache[b] = (lo, hi)
        lows.append(lo); highs.append(hi)
    return BandScaling(np.array(lows), np.array(highs), out_lo, out_hi, False, notes)


def _valid_mask_for_band(band, x, y, w, h, bw, bh, data=None) -> np.ndarray:
    flags = band.GetMaskFlags()
    if flags & gdal.GMF_ALL_VALID:
        return np.ones((bh, bw), dtype=bool)
    if flags & gdal.GMF_NODATA and data is not None:
        nd = band.GetNoDataValue()
        if nd is not None and np.isnan(nd):
            return ~np.isnan(data)
        return data != nd
    m = band.GetMaskBand().ReadAsArray(x, y, w, h, buf_xsize=bw, buf_ysize=bh)
    return m > 0


def decimated_valid_mask(ds: gdal.Dataset, bands: Sequence[int], side: int = 1024, name=None) -> Tuple[np.ndarray, float]:
    """Where the selected bands hold data, on a read decimated to at most ``side`` pixels a side (GDAL uses
    the overviews when there are some): valid where any selected band is valid (the nodata rule of
    :class:`StripReader`) and no float band holds NaN or +-inf.

    Returns:
        ``(valid bool (bh, bw), factor)``: raster pixels per decimated pixel (>= 1), the same on both axes.

    Raises:
        ReadError: GDAL cannot read the pixels, naming the file.
    """
    w, h = ds.RasterXSize, ds.RasterYSize
    f = max(1.0, max(w, h) / side)
    bw, bh = max(1, int(round(w / f))), max(1, int(round(h / f)))
    if not has_nodata(ds, bands):
        return np.ones((bh, bw), dtype=bool), f
    valid, finite = np.zeros((bh, bw), dtype=bool), np.ones((bh, bw), dtype=bool)
    with reading(name or ds.GetDescription()):
        for b in sorted(set(bands)):
            band = ds.GetRasterBand(b)
            arr = band.ReadAsArray(0, 0, w, h, buf_xsize=bw, buf_ysize=bh)
            valid |= _valid_mask_for_band(band, 0, 0, w, h, bw, bh, arr)
            if arr.dtype.kind in "fc":
                finite &= np.isfinite(arr)
    return valid & finite, f


FLOAT_TYPES = {gdal.GDT_Float32, gdal.GDT_Float64, gdal.GDT_CFloat32, gdal.GDT_CFloat64}


def has_nodata(ds: gdal.Dataset, bands: Sequence[int]) -> bool:
    """True when any selected band has a nodata value, a mask band or an alpha band, or is a float band
    (NaN and ±inf are always nodata: a float raster may hold them with no nodata tag)."""
    return any(not (ds.GetRasterBand(b).GetMaskFlags() & gdal.GMF_ALL_VALID)
               or ds.GetRasterBand(b).DataType in FLOAT_TYPES for b in set(bands))


class StripReader:
    """Reads strips of rows of the selected bands as scaled float32 plus a validity mask.

    A pixel is nodata when it is nodata (nodata value, mask band or alpha) in every selected band —
    GDAL's convention for multi-band nodata (as gdalwarp's UNIFIED_SRC_NODATA): one saturated band of
    an otherwise valid pixel does not erase it — or when any selected band holds NaN or ±inf there (a
    value no model input can take; issue 13: a NaN pixel otherwise poisons its whole window).
    """

    #: extra attempts at a strip whose read fails, and the first pause (doubled each time), in seconds: set
    #: for web map layers (:func:`core.geo.web.retry_reads`), whose servers drop requests; 0 for files
    retries = 0
    retry_delay_s = 1.0

    def __init__(self, ds: gdal.Dataset, bands: Sequence[int], scaling: BandScaling, name=None):
        self.ds = ds
        self.name = name or ds.GetDescription()  # the file, for messages
        self.bands = list(bands)
        self.unique = sorted(set(self.bands))
        self.scaling = scaling
        self.masked = has_nodata(ds, self.bands)
        self.width = ds.RasterXSize
        self.height = ds.RasterYSize

    def read(self, y0: int, rows: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Rows ``y0 .. y0+rows`` (clipped to the raster) of every column.

        Returns:
            ``(data, valid)``: data (n_bands, rows, width) in the model's value range — the raster's own
            type (uint8) when no scaling applies, else float32 (4 times smaller strips for uint8); valid
            bool (rows, width), or ``None`` when the raster has no nodata at all.

        Raises:
            ReadError: GDAL cannot read the strip (a truncated or damaged file; a web server that did not
                answer ``1 + retries`` times), naming it.
        """
        rows = min(rows, self.height - y0)
        if not self.retries:
            with reading(self.name):
                return self._read(y0, rows)
        from core.errors import web_read_error

        for attempt in range(self.retries + 1):
            try:
                return self._read(y0, rows)
            except RuntimeError as exc:  # GDAL could not fetch some tiles: they are asked for again
                if attempt == self.retries:
                    raise web_read_error(self.name, exc, attempt + 1) from None
                time.sleep(self.retry_delay_s * 2 ** attempt)

    def read_window(self, x0: int, y0: int, cols: int, rows: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The window of ``cols`` x ``rows`` pixels at column ``x0``, row ``y0`` (inside the raster), as
        :meth:`read` returns a strip: ``(data (n_bands, rows, cols), valid (rows, cols) or None)``.

        Raises:
            ReadError: GDAL cannot read it (a truncated or damaged file), naming the file.
        """
        with reading(self.name):
            return self._read(y0, rows, x0, cols)

    def _read(self, y0: int, rows: int, x0: int = 0, cols: Optional[int] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        cols = self.width if cols is None else cols
        raw = {}
        valid = None
        finite = None
        for b in self.unique:
            band = self.ds.GetRasterBand(b)
            arr = band.ReadAsArray(x0, y0, cols, rows)
            if self.masked:
                v = _valid_mask_for_band(band, x0, y0, cols, rows, cols, rows, arr)
                valid = v if valid is None else (valid | v)
            if arr.dtype.kind in "fc":
                ok = np.isfinite(arr)
                finite = ok if finite is None else (finite & ok)
                if not ok.all():
                    arr[~ok] = 0  # no NaN reaches the scaling or the model (arr is this read's own array)
            raw[b] = arr
        if finite is not None:
            valid = finite if valid is None else (valid & finite)
        data = np.stack([raw[b] for b in self.bands])
        if not self.scaling.identity:
            data = self.scaling.apply(data.astype(np.float32))
        return data, valid


# -- output ---------------------------------------------------------------------------------------
GTIFF_OPTIONS = ["TILED=YES", "BLOCKXSIZE=256", "BLOCKYSIZE=256", "COMPRESS=DEFLATE", "BIGTIFF=IF_SAFER"]


def check_output_path(path, overwrite: bool, what: str = "output") -> Path:
    """Check that ``path`` can be written before any work starts.

    Raises:
        InputError: the folder does not exist or is not writable; the file exists and ``overwrite``
            is false; the path is a folder.
    """
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise InputError(f"The {what} path {p} is a folder; give a file name such as {p / 'classes.tif'}")
    if not folder.is_dir():
        raise InputError(f"The {what} folder {folder} does not exist")
    try:  # a real probe: os.access() says yes to root even on read-only file systems
        check_writable_folder(folder)
    except OSError as exc:
        raise InputError(f"The {what} folder {folder} is not writable ({exc.strerror})") from exc
    if p.exists() and not overwrite:
        raise InputError(f"The {what} file {p} exists; pass --overwrite to replace it")
    return p


def files_read(ds, path=None, _seen: Optional[set] = None) -> List[Path]:
    """Every file the dataset ``ds`` (opened from ``path``) reads, resolved: its own file and side files
    (GDAL's ``GetFileList``: .aux.xml, .ovr, world files), and through a VRT each source file, nested VRTs
    followed. ``/vsi`` paths and in-memory datasets contribute nothing. (issue 13: an output may not be
    one of them, or ``--overwrite`` would destroy the input while it is read.)"""
    seen = set() if _seen is None else _seen
    base = Path(str(path or ds.GetDescription() or "."))
    out: List[Path] = []
    for name in ds.GetFileList() or []:
        if not name or name.startswith("/vsi"):
            continue
        f = Path(name)
        if not f.is_absolute():
            f = (base.parent / f) if (base.parent / f).exists() else Path(os.path.abspath(name))
        f = f.resolve()
        if f in seen:
            continue
        seen.add(f)
        out.append(f)
        if f.suffix.lower() == ".vrt" and f != base.resolve():
            try:
                nested = gdal.Open(str(f))
            except RuntimeError:
                continue
            out.extend(files_read(nested, f, seen))
    return out


def check_not_read(outputs: Sequence[Optional[Path]], inputs: Sequence[Tuple[object, object]]) -> None:
    """Refuse an output path that is a file an input reads (:func:`files_read`; ``inputs`` are
    ``(dataset, path)`` pairs, a dataset of None meaning just the path).

    Raises:
        InputError: naming the output, the input and how the input reads it (itself or a VRT source).
    """
    for ds, path in inputs:
        read = files_read(ds, path) if ds is not None else [Path(str(path)).resolve()]
        own = Path(str(path)).resolve()
        for out in outputs:
            if out is None:
                continue
            o = Path(out).resolve()
            if o in read:
                what = "is the input" if o == own else "is a file that the input"
                tail = "" if o == own else " reads (a VRT source or a side file)"
                raise InputError(f"The output {out} {what} {path}{tail}: writing it would destroy the input. "
                                 "Choose another output name.")


def pixel_size_m(ds) -> Optional[float]:
    """The ground size of a pixel in metres (square root of the pixel area), or None when the raster
    has no geotransform or a geographic / unknown CRS (degrees are not metres).

    Args:
        ds: a GDAL dataset. Returns: metres (float) or None.
    """
    gt = ds.GetGeoTransform(can_return_null=True)
    srs = ds.GetSpatialRef()
    if gt is None or srs is None or srs.IsGeographic() or not srs.IsProjected():
        return None
    area = abs(gt[1] * gt[5] - gt[2] * gt[4]) * srs.GetLinearUnits() ** 2
    return float(area ** 0.5) * ground_scale(ds) if area > 0 else None


GROUND_SCALE_TOLERANCE = 0.01  # a projection within 1 % of true scale (UTM: 0.04 %) is taken at its word


def ground_scale(ds) -> float:
    """Ground metres per metre of a projected CRS at the raster's centre: 1.0 when the projection's scale
    there is within :data:`GROUND_SCALE_TOLERANCE` of true (UTM and national grids), else the measured factor —
    Web Mercator (EPSG:3857, the CRS of XYZ tiles) stretches by 1/cos(latitude): one of its "metres" is 0.82
    ground metres at 35° latitude, 0.5 at 60°. Measured, not assumed: the centre pixel's sides are
    transformed to longitude/latitude and measured on the CRS's ellipsoid (the mean of both directions; a
    conformal projection scales both alike).

    Returns 1.0 for a raster without geotransform or projected CRS, or where the transformation fails.
    """
    import math

    from osgeo import osr

    gt = ds.GetGeoTransform(can_return_null=True)
    srs = ds.GetSpatialRef()
    if gt is None or srs is None or not srs.IsProjected():
        return 1.0
    try:
        geo = srs.CloneGeogCS()
        geo.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        tr = osr.CoordinateTransformation(srs, geo)
        cx, cy = ds.RasterXSize / 2.0, ds.RasterYSize / 2.0
        pts = [(gt[0] + c * gt[1] + r * gt[2], gt[3] + c * gt[4] + r * gt[5]) for c, r in ((cx, cy), (cx + 1, cy), (cx, cy + 1))]
        (lon0, lat0, _), (lon1, lat1, _), (lon2, lat2, _) = tr.TransformPoints(pts)
    except RuntimeError:
        return 1.0
    a, inv_f = srs.GetSemiMajor(), srs.GetInvFlattening()
    e2 = 0.0 if not inv_f else (2.0 - 1.0 / inv_f) / inv_f
    phi = math.radians(lat0)
    w = 1.0 - e2 * math.sin(phi) ** 2
    m_lat = math.radians(1.0) * a * (1.0 - e2) / w ** 1.5
    m_lon = math.radians(1.0) * a * math.cos(phi) / math.sqrt(w)

    def ground(lon, lat):
        return math.hypot((lon - lon0) * m_lon, (lat - lat0) * m_lat)

    unit = srs.GetLinearUnits()
    side_x = math.hypot(gt[1], gt[4]) * unit
    side_y = math.hypot(gt[2], gt[5]) * unit
    if side_x <= 0 or side_y <= 0:
        return 1.0
    k = 0.5 * (ground(lon1, lat1) / side_x + ground(lon2, lat2) / side_y)
    return 1.0 if not math.isfinite(k) or k <= 0 or abs(k - 1.0) <= GROUND_SCALE_TOLERANCE else float(k)


def resolution_warning(raster_gsd_m: Optional[float], model_gsd_m: Optional[float], factor: float = 2.0) -> Optional[str]:
    """A warning when the raster's pixels are more than ``factor`` times finer or coarser than the
    model's training ground sample distance (both in metres); None when either is unknown or they match.

    Objects then appear at a scale the model never saw (a 10 cm forest scene to a 0.8 m model: tree
    crowns the size of building blocks); the message says what to do.
    """
    if not raster_gsd_m or not model_gsd_m:
        return None
    ratio = raster_gsd_m / model_gsd_m
    if 1.0 / factor <= ratio <= factor:
        return None
    finer = ratio < 1.0
    return (f"the raster's pixels are {raster_gsd_m:.2f} m, the model was trained at {model_gsd_m:.2f} m "
            f"({(1 / ratio if finer else ratio):.1f}x {'finer' if finer else 'coarser'}): objects appear at a scale "
            f"it has not seen, expect poor classes. Resample the raster to about {model_gsd_m:g} m "
            f"(gdal_translate -tr / Raster > Align rasters) or fine-tune the model on imagery like it.")


def crs_label(srs) -> Optional[str]:
    """``AUTHORITY:CODE`` of a spatial reference when it has or can be given one, else its WKT; None."""
    if srs is None:
        return None
    s = srs.Clone()
    if not s.GetAuthorityCode(None):
        try:
            s.AutoIdentifyEPSG()
        except RuntimeError:
            pass
    code = s.GetAuthorityCode(None)
    return f"{s.GetAuthorityName(None)}:{code}" if code else srs.ExportToWkt()


def hex_to_rgb(colour: str) -> Tuple[int, int, int]:
    c = colour.lstrip("#")
    if len(c) != 6:
        raise ValueError(f"colour must be #RRGGBB, got {colour!r}")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


class AtomicGeoTIFF:
    """A GeoTIFF written to a temporary file beside ``path`` and renamed onto it by :meth:`commit`.

    Until :meth:`commit`, nothing exists under the target name; :meth:`discard` (or leaving a ``with``
    block by an exception) removes the temporary file and its sidecars.
    """

    def __init__(self, path, like: Optional[gdal.Dataset], bands: int, dtype=gdal.GDT_Byte, options=GTIFF_OPTIONS,
                 *, size: Optional[Tuple[int, int]] = None, geotransform=None, srs=None):
        """``like``: the dataset whose size, geotransform, CRS (and GCPs) the output takes; or ``None`` with
        ``size`` ``(width, height)`` in pixels and an optional ``geotransform`` and ``srs``."""
        self.path = Path(path)
        tmp = str(partial_path(self.path.with_suffix(".tif")))
        self.tmp = tmp
        driver = gdal.GetDriverByName("GTiff")
        if like is not None:
            size, geotransform, srs = ((like.RasterXSize, like.RasterYSize), like.GetGeoTransform(can_return_null=True),
                                       like.GetSpatialRef())
        try:
            with writing(self.path):
                self.ds = driver.Create(tmp, size[0], size[1], bands, dtype, list(options))
        except BaseException:
            discard(tmp)
            raise
        if geotransform is not None:
            self.ds.SetGeoTransform(geotransform)
        if srs is not None:
            self.ds.SetSpatialRef(srs)
        if like is not None and like.GetGCPCount():
            self.ds.SetGCPs(like.GetGCPs(), like.GetGCPSpatialRef())

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.discard()
        return False

    def band(self, i: int = 1):
        return self.ds.GetRasterBand(i)

    def write(self, band: int, array: np.ndarray, x: int, y: int) -> None:
        """``array`` (rows, cols) into 1-based ``band`` at pixel ``(x, y)``. Raises WriteError (a full
        disk) / InputError, naming the output, not its partial file."""
        with writing(self.path):
            self.ds.GetRasterBand(band).WriteArray(array, x, y)

    def close(self) -> None:
        """Write the last blocks and close the temporary file, checked (:func:`checked_close`): a full
        disk fails here, before anything is published. Raises WriteError / InputError."""
        if self.ds is None:
            return
        with checked_close(self.path):
            self.ds.FlushCache()
            self.ds = None

    def publish(self) -> Path:
        """Rename the closed temporary file (and its ``.aux.xml``) onto the target; returns the target."""
        publish(self.tmp, self.path)
        aux = self.tmp + ".aux.xml"
        if os.path.exists(aux):
            os.replace(aux, str(self.path) + ".aux.xml")
        elif os.path.exists(str(self.path) + ".aux.xml"):
            os.unlink(str(self.path) + ".aux.xml")  # a stale sidecar of a replaced file
        return self.path

    def commit(self) -> Path:
        """:meth:`close` then :meth:`publish`. (Several outputs of one run: close them all, then publish
        them all, so that a full disk on the last leaves none of them.)"""
        self.close()
        return self.publish()

    def discard(self) -> None:
        with discarding():
            self.ds = None
        discard(self.tmp)


def style_class_band(band, classes: Sequence[dict]) -> None:
    """Colour table, category names, nodata 255 and a description on a class-raster band."""
    ct = gdal.ColorTable()
    names = [""] * (max(int(c["id"]) for c in classes) + 1)
    for c in classes:
        r, g, b = hex_to_rgb(c.get("colour") or "#808080")
        ct.SetColorEntry(int(c["id"]), (r, g, b, 255))
        names[int(c["id"])] = str(c["name"])
    ct.SetColorEntry(NODATA_CLASS, (0, 0, 0, 0))
    band.SetColorTable(ct)
    band.SetColorInterpretation(gdal.GCI_PaletteIndex)
    band.SetCategoryNames(names)
    band.SetNoDataValue(NODATA_CLASS)
    band.SetDescription("class")
