"""Test scenes from real Dubai tiles: georeferenced RGB GeoTIFFs and example polygon layers polygonised
from real label masks (no torch, no QGIS: the engine tests and the QGIS tests both import it)."""
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


def write_rgb_geotiff(path, image: np.ndarray, gt, srs) -> None:
    """Write a uint8 (3, H, W) RGB image as a GeoTIFF on the grid ``gt`` in ``srs``, bands tagged red,
    green, blue (as an analyst's orthophoto)."""
    from osgeo import gdal

    _, H, W = image.shape
    ds = gdal.GetDriverByName("GTiff").Create(str(path), W, H, 3, gdal.GDT_Byte)
    ds.SetGeoTransform(gt)
    ds.SetSpatialRef(srs)
    for b, ci in enumerate((gdal.GCI_RedBand, gdal.GCI_GreenBand, gdal.GCI_BlueBand)):
        ds.GetRasterBand(b + 1).WriteArray(image[b])
        ds.GetRasterBand(b + 1).SetColorInterpretation(ci)
    ds.FlushCache()
    ds = None
