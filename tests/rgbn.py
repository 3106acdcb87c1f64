"""A real 4-band (red, green, blue, "NIR") GeoTIFF for the multispectral tests of the engine and of QGIS (no torch,
no QGIS here): the RGB of the Dubai aerial tile 1 image_part_001 (797 x 644) and, as band 4 (described "NIR"), the
real SpaceNet Atlanta panchromatic band (900 x 900 uint16) resampled onto those pixels and stretched to 0..255 —
real pixels of two sources, not physically near-infrared (../shared/data has no RGB+NIR scene)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_rgbn(folder: Path, dubai_image: Path, atlanta: Path) -> dict:
    """Write ``rgbn.tif`` (4 bands: RGB interpretation + band 4 "NIR") and ``rgb.tif`` (the same RGB) into
    ``folder``; returns ``{"rgbn": path, "rgb": path}``."""
    from osgeo import gdal

    rgb = gdal.Open(str(dubai_image)).ReadAsArray()  # (3, 644, 797) uint8
    _, h, w = rgb.shape
    pan = gdal.Translate("", str(atlanta), format="MEM", width=w, height=h, resampleAlg="average").ReadAsArray()
    lo, hi = np.percentile(pan[pan > 0], [2, 98])
    nir = np.clip((pan.astype(np.float64) - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    paths = {}
    for name, bands in (("rgbn", [*rgb, nir]), ("rgb", list(rgb))):
        path = Path(folder) / f"{name}.tif"
        ds = gdal.GetDriverByName("GTiff").Create(str(path), w, h, len(bands), gdal.GDT_Byte,
                                                  ["PHOTOMETRIC=RGB"] if name == "rgb" else [])
        for i, a in enumerate(bands):
            band = ds.GetRasterBand(i + 1)
            band.WriteArray(a)
            band.SetColorInterpretation([gdal.GCI_RedBand, gdal.GCI_GreenBand, gdal.GCI_BlueBand,
                                         gdal.GCI_Undefined][i])
        if name == "rgbn":
            ds.GetRasterBand(4).SetDescription("NIR")
        band = None
        ds = None
        paths[name] = path
    return paths
