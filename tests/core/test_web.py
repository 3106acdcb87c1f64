"""The engine's side of web map layers (issue 15, part 2; core/geo/web.py) and the ground scale of a
projected CRS (core/geo/raster.py: ground_scale), without the network: a GDAL service description that
points at a closed port on 127.0.0.1, and real rasters of ../shared/data reprojected with GDAL. The end-to-end
runs (a local tile server) are in tests/qgis/test_qgis_web.py."""
from __future__ import annotations

import math
import socket
import subprocess
import sys

import numpy as np
import pytest
from osgeo import gdal

from conftest import ADELAIDE, OSBS, ROOT, engine_env

gdal.UseExceptions()
HALF = 20037508.342789244


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connection is refused at once
    return port


def _service(tmp_path, port: int, level: int = 18):
    xml = (f"<GDAL_WMS><Service name=\"TMS\"><ServerUrl>http://127.0.0.1:{port}/${{z}}/${{x}}/${{y}}.png</ServerUrl>"
           f"</Service><DataWindow><UpperLeftX>{-HALF!r}</UpperLeftX><UpperLeftY>{HALF!r}</UpperLeftY>"
           f"<LowerRightX>{HALF!r}</LowerRightX><LowerRightY>{-HALF!r}</LowerRightY><TileLevel>{level}</TileLevel>"
           "<TileCountX>1</TileCountX><TileCountY>1</TileCountY><YOrigin>top</YOrigin></DataWindow>"
           "<Projection>EPSG:3857</Projection><BlockSizeX>256</BlockSizeX><BlockSizeY>256</BlockSizeY>"
           "<BandsCount>4</BandsCount><Timeout>5</Timeout></GDAL_WMS>")
    path = tmp_path / "service.xml"
    path.write_text(xml)
    return path


def test_ground_scale_of_web_mercator_is_the_cosine_of_latitude_and_utm_is_taken_as_true():
    from core.geo.raster import ground_scale, pixel_size_m

    merc = gdal.Warp("", str(ADELAIDE), format="VRT", dstSRS="EPSG:3857")
    gt = merc.GetGeoTransform()
    lat = math.degrees(2 * math.atan(math.exp((gt[3] + gt[5] * merc.RasterYSize / 2) / 6378137.0)) - math.pi / 2)
    assert lat == pytest.approx(-34.38, abs=0.01)
    k = ground_scale(merc)
    assert k == pytest.approx(math.cos(math.radians(lat)), rel=2e-3)  # the sphere's cos(lat), on WGS84
    assert pixel_size_m(merc) == pytest.approx(abs(gt[1]) * k, rel=1e-6)
    utm = gdal.Open(str(OSBS))  # UTM 17N: 0.04 % off true scale at most, taken at its word
    assert ground_scale(utm) == 1.0
    assert pixel_size_m(utm) == pytest.approx(abs(utm.GetGeoTransform()[1]))
    assert ground_scale(gdal.Open(str(ADELAIDE))) == 1.0  # geographic: not a projected CRS


def test_a_web_source_without_an_area_is_refused(tmp_path):
    from core.errors import InputError
    from core.geo import web

    ds = gdal.Open(str(_service(tmp_path, _closed_port())))
    assert web.is_web(ds) and web.from_web(ds)
    with pytest.raises(InputError, match=r"web map layer \(67108864 x 67108864 px"):
        web.check_area(ds, "service.xml", None)
    web.check_area(ds, "service.xml", object())  # with an area: fine
    sub = gdal.Translate("", ds, format="VRT", srcWin=[0, 0, 10, 10])
    assert not web.from_web(sub) and web.from_web(web.mark(sub))
    assert not web.is_web(gdal.Open(str(OSBS)))


def test_a_strip_of_a_web_source_is_read_again_then_the_server_is_named(tmp_path, monkeypatch):
    from core.errors import ReadError
    from core.geo import raster as raster_mod
    from core.geo.raster import BandScaling, StripReader
    from core.geo.web import retry_reads

    path = _service(tmp_path, _closed_port())
    ds = gdal.Open(str(path))
    sub = gdal.Translate("", ds, format="VRT", srcWin=[232104 * 256, 157761 * 256, 300, 40])
    reader = StripReader(sub, [1, 2, 3], BandScaling(np.zeros(3), np.full(3, 255.0), 0.0, 255.0, True, []))
    pauses = []
    monkeypatch.setattr(raster_mod.time, "sleep", pauses.append)
    retry_reads(reader, path)
    with pytest.raises(ReadError) as err:
        reader.read(0, 40)
    msg = str(err.value)
    assert f"Cannot read the web map layer {path}" in msg and "server did not answer" in msg
    assert "4 attempts" in msg and "127.0.0.1" in msg and "ZeroBlockHttpCodes" not in msg, msg
    assert pauses == [1.0, 2.0, 4.0]  # doubling pauses between the 4 attempts
    plain = StripReader(sub, [1, 2, 3], reader.scaling)  # a file's reader does not retry: one attempt
    with pytest.raises(ReadError, match="truncated or damaged"):
        plain.read(0, 40)
    assert pauses == [1.0, 2.0, 4.0]


def test_segment_on_an_unanswering_web_source_exits_2_with_the_server_named_and_no_output(tmp_path):
    path = _service(tmp_path, _closed_port())
    out = tmp_path / "classes.tif"
    extent = "15445171.68,-4080820.07,15445783.18,-4080055.70"
    env = engine_env()
    proc = subprocess.run([sys.executable, "-m", "core", "segment", str(path), str(out), "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    assert proc.returncode == 2 and "give the area to segment" in proc.stderr, proc.stderr[-800:]
    proc = subprocess.run([sys.executable, "-m", "core", "segment", str(path), str(out), "--device", "cpu",
                           "--extent", extent], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    assert proc.returncode == 2, proc.stderr[-800:]
    assert "web map layer" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["service.xml"]
