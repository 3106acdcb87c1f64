"""The resolution check of segmentation: a raster far finer or coarser than the model's training GSD
gets a warning that says what to do (real rasters of ../shared/data)."""
from __future__ import annotations

import pytest
from osgeo import gdal

from conftest import ADELAIDE, ATLANTA, OSBS
from core.model.modelfile import DEFAULT_MODEL_PATH, read_header
from core.geo.raster import pixel_size_m, resolution_warning


def _gsd(path):
    ds = gdal.Open(str(path))
    try:
        return pixel_size_m(ds)
    finally:
        ds = None


def test_pixel_size_of_real_rasters():
    assert _gsd(OSBS) == pytest.approx(0.1, rel=1e-6)  # NEON, EPSG:32617, 10 cm
    assert _gsd(ATLANTA) == pytest.approx(0.5, rel=0.1)  # SpaceNet WV-2 pan, EPSG:32616, ~0.5 m
    assert _gsd(ADELAIDE) is None  # EPSG:4326: degrees, not metres


def test_warning_when_the_raster_is_far_finer_or_coarser_than_the_model():
    gsd = read_header(DEFAULT_MODEL_PATH)["gsd_m"]
    assert gsd == pytest.approx(0.8)
    msg = resolution_warning(_gsd(OSBS), gsd)
    assert msg is not None and "0.10 m" in msg and "0.80 m" in msg and "8.0x finer" in msg and "Resample" in msg
    assert "coarser" in resolution_warning(3.0, 0.8)
    assert resolution_warning(_gsd(ATLANTA), gsd) is None  # within a factor 2
    assert resolution_warning(None, gsd) is None and resolution_warning(0.1, None) is None
