"""Example polygon layers for the tests, polygonised from real label masks (no torch, no QGIS: the
engine tests and the QGIS tests both import it)."""
from __future__ import annotations

import numpy as np


def polygonize_mask(path, mask: np.ndarray, gt, srs, layer: str = "water", negative=None) -> int:
    """Write the True cells of a boolean mask (H, W) as polygons (GDAL Polygonize) into a GeoPackage
    layer on the grid ``gt`` (GDAL geotransform) in ``srs`` (osr.SpatialReference); with ``negative``
    (a bool), a boolean field ``negative`` set to it. Returns the number of polygons."""
    from osgeo import gdal, ogr

    H, W = mask.shape
    m = gdal.GetDriverByName("MEM").Create("", W, H, 1, gdal.GDT_Byte)
    m.SetGeoTransform(gt)
    m.SetSpatialRef(srs)
    band = m.GetRasterBand(1)
    band.WriteArray(mask.astype(np.uint8))
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    lyr = ds.CreateLayer(layer, srs=srs, geom_type=ogr.wkbPolygon)
    lyr.CreateField(ogr.FieldDefn("value", ogr.OFTInteger))
    if negative is not None:
        fd = ogr.FieldDefn("negative", ogr.OFTInteger)
        fd.SetSubType(ogr.OFSTBoolean)
        lyr.CreateField(fd)
    gdal.Polygonize(band, band, lyr, 0)
    if negative is not None:
        for f in lyr:
            f.SetField("negative", int(negative))
            lyr.SetFeature(f)
    n = lyr.GetFeatureCount()
    band = lyr = ds = m = None  # close in this order (GDAL < 3.8 frees the band under its dataset)
    return n
