"""srmf:segment on web map layers (issue 15, part 2), without the network: XYZ tiles and a WMS cut with GDAL
from the real Adelaide GeoTIFF (../shared/data/openearthmap_adelaide/adelaide_2.tif, EPSG:4326, ~0.45 m) and
served on 127.0.0.1 by a server the test starts.

The tiles are the GeoTIFF warped to EPSG:3857 on the level-18 tile grid (0.597 CRS metres, 0.49 m on the
ground at -34.4° latitude) with an alpha band, cut into 256 px PNG tiles. The reference is srmf:segment on
that warped GeoTIFF itself, with the same extent and processing resolution: the web layer must give the
same classes. Not all pixels are equal (measured: 99.93 % for XYZ and WMTS): GDAL's average resampling to the processing
resolution rounds a few pixels differently when its source comes in 256 px tiles rather than in the
GeoTIFF's strips (0.007 % of the resampled input pixels differ by one grey level), and a handful of
those fall on a class boundary.
"""
from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from qgis.core import QgsProcessingException, QgsProject, QgsRasterLayer

from srmf_qgis_testing import ADELAIDE, VENV_PYTHON, ROOT, make_feedback, run_alg

Z = 18
HALF = 20037508.342789244
RES = 2 * HALF / (256 * 2 ** Z)  # EPSG:3857 units per pixel at level Z


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """{"dir": the z/x/y.png tree, "reference": the warped GeoTIFF, "extent": (xmin, ymin, xmax, ymax) in
    EPSG:3857 covering exactly the tiles}."""
    from osgeo import gdal

    gdal.UseExceptions()
    root = tmp_path_factory.mktemp("xyz")
    probe = gdal.Warp("", str(ADELAIDE), format="VRT", dstSRS="EPSG:3857")
    gt, w, h = probe.GetGeoTransform(), probe.RasterXSize, probe.RasterYSize
    x0, y1 = gt[0], gt[3]
    x1, y0 = x0 + w * gt[1], y1 + h * gt[5]
    probe = None
    size = 256 * RES
    tx0, tx1 = int((x0 + HALF) // size), int((x1 + HALF) // size)
    ty0, ty1 = int((HALF - y1) // size), int((HALF - y0) // size)
    extent = (-HALF + tx0 * size, HALF - (ty1 + 1) * size, -HALF + (tx1 + 1) * size, HALF - ty0 * size)
    reference = root / "adelaide_3857_z18.tif"
    ds = gdal.Warp(str(reference), str(ADELAIDE), dstSRS="EPSG:3857", xRes=RES, yRes=RES, outputBounds=extent,
                   dstAlpha=True, resampleAlg="bilinear")
    old = gdal.GetConfigOption("GDAL_PAM_ENABLED")
    gdal.SetConfigOption("GDAL_PAM_ENABLED", "NO")  # no .aux.xml beside the tiles
    try:
        for tx in range(tx0, tx1 + 1):
            for ty in range(ty0, ty1 + 1):
                folder = root / "tiles" / str(Z) / str(tx)
                folder.mkdir(parents=True, exist_ok=True)
                gdal.Translate(str(folder / f"{ty}.png"), ds, format="PNG",
                               srcWin=[(tx - tx0) * 256, (ty - ty0) * 256, 256, 256])
    finally:
        gdal.SetConfigOption("GDAL_PAM_ENABLED", old)
    ds = None
    return {"dir": root / "tiles", "reference": reference, "extent": extent,
            "count": (tx1 - tx0 + 1) * (ty1 - ty0 + 1)}


def _wmts_capabilities(port: int, zmax: int = Z) -> str:
    """A WMTS 1.0 capabilities document (RESTful) for the tiles: one layer "adelaide" on GoogleMapsCompatible
    (EPSG:3857, levels 0..zmax; OGC's scale denominators: pixel size / 0.28 mm)."""
    mats = "".join(
        f"<TileMatrix><ows:Identifier>{z}</ows:Identifier><ScaleDenominator>{(2 * HALF / 256 / 2 ** z) / 0.00028!r}"
        f"</ScaleDenominator><TopLeftCorner>{-HALF!r} {HALF!r}</TopLeftCorner><TileWidth>256</TileWidth>"
        f"<TileHeight>256</TileHeight><MatrixWidth>{2 ** z}</MatrixWidth><MatrixHeight>{2 ** z}</MatrixHeight></TileMatrix>"
        for z in range(zmax + 1))
    return ('<?xml version="1.0" encoding="UTF-8"?><Capabilities xmlns="http://www.opengis.net/wmts/1.0" '
            'xmlns:ows="http://www.opengis.net/ows/1.1" xmlns:xlink="http://www.w3.org/1999/xlink" version="1.0.0">'
            "<ows:ServiceIdentification><ows:Title>test</ows:Title><ows:ServiceType>OGC WMTS</ows:ServiceType>"
            "<ows:ServiceTypeVersion>1.0.0</ows:ServiceTypeVersion></ows:ServiceIdentification><Contents><Layer>"
            "<ows:Title>adelaide</ows:Title><ows:Identifier>adelaide</ows:Identifier><ows:WGS84BoundingBox>"
            "<ows:LowerCorner>-180 -85.0511287798</ows:LowerCorner><ows:UpperCorner>180 85.0511287798</ows:UpperCorner>"
            '</ows:WGS84BoundingBox><Style isDefault="true"><ows:Identifier>default</ows:Identifier></Style>'
            "<Format>image/png</Format><TileMatrixSetLink><TileMatrixSet>GoogleMapsCompatible</TileMatrixSet>"
            f'</TileMatrixSetLink><ResourceURL format="image/png" resourceType="tile" template="http://127.0.0.1:{port}/'
            '{TileMatrix}/{TileCol}/{TileRow}.png"/></Layer><TileMatrixSet><ows:Identifier>GoogleMapsCompatible'
            "</ows:Identifier><ows:SupportedCRS>urn:ogc:def:crs:EPSG::3857</ows:SupportedCRS>" + mats
            + "</TileMatrixSet></Contents></Capabilities>")


class _Server:
    """A tile server on 127.0.0.1 (a port of its own, so GDAL's tile cache never answers for it): XYZ files
    from ``directory``; WMS GetMap requests cut from ``wms_source`` with GDAL; after ``fail_after`` requests
    every request gets HTTP 503 (the server "stops answering"). Only the engine's requests (GDAL with SRMF's
    User-Agent) are counted and failed: QGIS may render the layer on the test's map canvas meanwhile."""

    def __init__(self, directory: Path, wms_source: Path = None, fail_after: int = None):
        self.requests = 0
        self.served = 0  # tiles that exist, sent
        self.failed = 0
        self.fail_after = fail_after
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                if self.path.endswith("/WMTSCapabilities.xml"):
                    body = _wmts_capabilities(server.port).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if not self.headers.get("User-Agent", "").startswith("SRMF for QGIS"):
                    return super().do_GET()  # QGIS's own map rendering of the layer: not counted, never failed
                with server.lock:
                    server.requests += 1
                    fail = server.fail_after is not None and server.requests > server.fail_after
                    server.failed += int(fail)
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path.startswith("/wms"):
                    return self._wms()
                if Path(self.translate_path(self.path)).is_file():
                    with server.lock:
                        server.served += 1
                return super().do_GET()

            def _wms(self):
                body = server.render_wms(parse_qs(urlparse(self.path).query))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.wms_source = wms_source
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def render_wms(self, q) -> bytes:
        from osgeo import gdal

        p = {k.upper(): v[0] for k, v in q.items()}
        assert p["REQUEST"] == "GetMap" and p["SRS"] == "EPSG:3857", p
        xmin, ymin, xmax, ymax = map(float, p["BBOX"].split(","))
        name = f"/vsimem/wms_{threading.get_ident()}.png"
        tmp = gdal.Warp("", str(self.wms_source), format="MEM", outputBounds=(xmin, ymin, xmax, ymax),
                        width=int(p["WIDTH"]), height=int(p["HEIGHT"]), resampleAlg="near")
        gdal.Translate(name, tmp, format="PNG")
        f = gdal.VSIFOpenL(name, "rb")
        gdal.VSIFSeekL(f, 0, 2)
        n = gdal.VSIFTellL(f)
        gdal.VSIFSeekL(f, 0, 0)
        data = gdal.VSIFReadL(1, n, f)
        gdal.VSIFCloseL(f)
        gdal.Unlink(name)
        return data

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(directory, **kw):
        servers.append(_Server(directory, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _xyz_layer(port: int) -> QgsRasterLayer:
    layer = QgsRasterLayer(f"type=xyz&url=http://127.0.0.1:{port}/%7Bz%7D/%7Bx%7D/%7By%7D.png&zmin=0&zmax={Z}",
                           "Adelaide tiles", "wms")
    assert layer.isValid(), layer.error().summary()
    QgsProject.instance().addMapLayer(layer)
    return layer


def _extent_param(extent) -> str:
    return f"{extent[0]!r},{extent[2]!r},{extent[1]!r},{extent[3]!r} [EPSG:3857]"


def _segment(source, extent, out: Path, resolution=0.8, **extra):
    fb = make_feedback()
    params = {"INPUT": source, "EXTENT": _extent_param(extent), "RESOLUTION": resolution, "DEVICE": 1,
              "PRECISION": 1, "OUTPUT": str(out), "OUTPUT_AREAS": None, **extra}
    return run_alg("srmf:segment", params, fb), fb


def read_band(path):
    from osgeo import gdal

    ds = gdal.Open(str(path))  # kept alive while its band is read (GDAL < 3.8)
    arr = ds.GetRasterBand(1).ReadAsArray()
    ds = None
    return arr


def _grid(path):
    from osgeo import gdal

    ds = gdal.Open(str(path))
    out = ds.GetGeoTransform(), (ds.RasterXSize, ds.RasterYSize), ds.GetSpatialRef().GetAuthorityCode(None)
    ds = None
    return out


def _record(artifacts, key, value):
    import json

    path = artifacts / "web_layers.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1))


def test_an_xyz_layer_gives_the_classes_of_the_geotiff_it_was_cut_from(provider, tiles, serve, tmp_path, clean_project,
                                                                      artifacts):
    server = serve(tiles["dir"])
    layer = _xyz_layer(server.port)
    web_res, fb = _segment(layer.id(), tiles["extent"], tmp_path / "web.tif")
    assert any(f"tile level {Z}" in i for i in fb.infos), fb.infos
    assert server.requests >= tiles["count"]  # every tile of the area was fetched (some 404s around it)
    ref_res, _ = _segment(str(tiles["reference"]), tiles["extent"], tmp_path / "reference.tif")
    assert _grid(web_res["OUTPUT"]) == _grid(ref_res["OUTPUT"])
    gt, size, epsg = _grid(web_res["OUTPUT"])
    assert epsg == "3857" and size == (1024, 1280) and gt[1] == pytest.approx(RES)
    web, ref = read_band(web_res["OUTPUT"]), read_band(ref_res["OUTPUT"])
    assert ((web == 255) == (ref == 255)).all()  # the alpha of the tiles is the nodata of the GeoTIFF
    valid = ref != 255
    assert valid.mean() > 0.5
    same = float((web[valid] == ref[valid]).mean())
    _record(artifacts, "xyz_same_classes", same)
    assert same >= 0.99, same
    # the areas are ground areas: EPSG:3857 metres are scaled by cos(latitude) (0.82 here)
    assert "projection's scale" in web_res["AREA_NOTE"]
    pixel_m2 = RES * RES * 0.8243 ** 2
    for row in web_res["CLASS_AREAS"]:
        assert row["area_m2"] == pytest.approx(row["pixels"] * pixel_m2, rel=1e-3)

    # a second run over the same area downloads no tile again: they come from the cache (only the missing
    # neighbours the edge windows touch, answered 404 and not cached, are asked for again)
    before = server.served
    assert before == tiles["count"]
    again, _ = _segment(layer.id(), tiles["extent"], tmp_path / "again.tif")
    assert (read_band(again["OUTPUT"]) == web).all()
    assert server.served == before


def test_a_server_that_stops_answering_half_way_fails_clearly_and_leaves_nothing(provider, tiles, serve, tmp_path,
                                                                                 clean_project):
    server = serve(tiles["dir"], fail_after=tiles["count"] // 2)
    layer = _xyz_layer(server.port)
    out = tmp_path / "web.tif"
    with pytest.raises(QgsProcessingException) as err:
        _segment(layer.id(), tiles["extent"], out)
    msg = str(err.value)
    assert "web map layer" in msg and "server did not answer" in msg and "503" in msg, msg
    assert "4 attempts" in msg and "ZeroBlockHttpCodes" not in msg and "Traceback" not in msg, msg
    assert not out.exists() and not list(tmp_path.glob("web*"))
    assert server.failed >= 4  # the failed tiles were asked for again before giving up


def test_a_wms_layer_gives_the_classes_of_its_source(provider, tiles, serve, tmp_path, clean_project, artifacts):
    from osgeo import gdal

    server = serve(tiles["dir"], wms_source=tiles["reference"])
    layer = QgsRasterLayer(f"crs=EPSG:3857&format=image/png&layers=adelaide&styles=&url=http://127.0.0.1:{server.port}/wms",
                           "Adelaide WMS", "wms")
    e = tiles["extent"]
    inner = (e[0] + 100.0, e[1] + 100.0, e[2] - 100.0, e[3] - 100.0)
    res, _ = _run_wms_source(layer, inner, tmp_path / "wms.tif")
    gt, size, epsg = _grid(res["OUTPUT"])
    assert epsg == "3857"
    # the reference: the same grid cut from the GeoTIFF in one piece (nearest, as the server draws it)
    ref_in = tmp_path / "reference.tif"
    gdal.Warp(str(ref_in), str(tiles["reference"]), outputBounds=(gt[0], gt[3] + size[1] * gt[5], gt[0] + size[0] * gt[1], gt[3]),
              width=size[0], height=size[1], resampleAlg="near")
    ref, _ = _segment(str(ref_in), (gt[0], gt[3] + size[1] * gt[5], gt[0] + size[0] * gt[1], gt[3]),
                      tmp_path / "ref.tif", resolution=0.5)
    assert _grid(ref["OUTPUT"]) == (gt, size, epsg)
    a, b = read_band(res["OUTPUT"]), read_band(ref["OUTPUT"])
    _record(artifacts, "wms_same_classes", float((a == b).mean()))
    assert float((a == b).mean()) >= 0.99
    assert server.requests > 0


def test_a_wmts_layer_gives_the_classes_of_the_xyz_tiles_it_serves(provider, tiles, serve, tmp_path, clean_project,
                                                                     artifacts):
    """A QGIS WMTS layer of a capabilities document served with the tiles (RESTful, GoogleMapsCompatible): tile
    matrix 18 is chosen for 0.8 m, the classes equal those of the GeoTIFF the tiles were cut from (as XYZ)."""
    server = serve(tiles["dir"])
    layer = QgsRasterLayer("crs=EPSG:3857&format=image/png&layers=adelaide&styles=default&tileMatrixSet="
                           f"GoogleMapsCompatible&url=http://127.0.0.1:{server.port}/WMTSCapabilities.xml",
                           "Adelaide WMTS", "wms")
    assert layer.isValid(), layer.error().summary()
    QgsProject.instance().addMapLayer(layer)
    res, fb = _segment(layer.id(), tiles["extent"], tmp_path / "wmts.tif")
    assert any(f"tile matrix {Z}" in i for i in fb.infos), fb.infos
    ref, _ = _segment(str(tiles["reference"]), tiles["extent"], tmp_path / "reference.tif")
    assert _grid(res["OUTPUT"]) == _grid(ref["OUTPUT"])
    a, b = read_band(res["OUTPUT"]), read_band(ref["OUTPUT"])
    valid = b != 255
    same = float((a[valid] == b[valid]).mean())
    _record(artifacts, "wmts_same_classes", same)
    assert ((a == 255) == (b == 255)).all() and same >= 0.99, same


def _run_wms_source(layer, extent, out):
    """The WMS path of srmf:segment without QGIS's WMS provider, which asks the server for a capabilities
    document before it makes a layer valid (the test server has none): the service description that
    srmf:segment writes for the layer (:func:`srmf_qgis.web.web_source`), segmented as srmf:segment does."""
    from qgis.core import QgsRectangle
    from srmf_qgis import web

    path, area, _ = web.web_source(layer, QgsRectangle(*extent), 0.5, str(out.parent), str(out.parent / "cache"))
    fb = make_feedback()
    res = run_alg("srmf:segment", {"INPUT": path, "EXTENT": _extent_param(extent), "RESOLUTION": 0.5, "DEVICE": 1,
                                   "PRECISION": 1, "OUTPUT": str(out), "OUTPUT_AREAS": None}, fb)
    return res, fb


def test_web_layers_refuse_what_they_cannot_do(provider, tiles, serve, tmp_path, clean_project):
    import subprocess

    from qgis.core import QgsRectangle
    from srmf_qgis import web

    server = serve(tiles["dir"])
    layer = _xyz_layer(server.port)
    out = tmp_path / "x.tif"
    cases = [
        ({"RESOLUTION": 0}, "no pixels of its own"),
        ({"EXTENT": None}, "covers the whole world"),
    ]
    nogsd = tmp_path / "untrained.srmf"  # the untrained placeholder records no training GSD
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([str(VENV_PYTHON), "-m", "core.model.default", str(nogsd)], check=True, env=env, capture_output=True)
    cases.append(({"RESOLUTION": None, "MODEL": str(nogsd)}, "needs a processing resolution"))
    for extra, words in cases:
        with pytest.raises(QgsProcessingException) as err:
            _segment(layer.id(), tiles["extent"], out, **extra)
        assert words in str(err.value), (extra, str(err.value))
        assert not out.exists()
    assert server.requests == 0  # refused before any tile was asked for
    wmts = QgsRasterLayer("crs=EPSG:3857&format=image/png&layers=x&styles=default&tileMatrixSet=GoogleMapsCompatible"
                          "&url=http://127.0.0.1:9/WMTSCapabilities.xml", "a WMTS", "wms")
    with pytest.raises(QgsProcessingException, match="WMTS layer 'a WMTS': GDAL cannot read its service"):
        web.web_source(wmts, QgsRectangle(*tiles["extent"]), 0.8, str(tmp_path))  # nothing listens on port 9
    quad = QgsRasterLayer("type=xyz&url=http://127.0.0.1:9/%7Bq%7D.png", "quadkeys", "wms")
    with pytest.raises(QgsProcessingException, match=r"\{q\}"):
        web.web_source(quad, QgsRectangle(*tiles["extent"]), 0.8, str(tmp_path))


def test_the_zoom_level_is_the_finest_not_coarser_than_the_resolution(qgis_app):
    from qgis.core import QgsPointXY
    from srmf_qgis import web

    adelaide = QgsPointXY(15445477.0, -4080438.0)  # -34.38° latitude: level 18 is 0.49 m, 17 is 0.98 m
    assert web.xyz_zoom(adelaide, 0.8) == 18
    assert web.xyz_zoom(adelaide, 0.49) == 19
    assert web.xyz_zoom(adelaide, 1.0) == 17
    assert web.xyz_zoom(adelaide, 0.1, zmax=18) == 18
    equator = QgsPointXY(0.0, 0.0)  # level 0 is 156 543 m at the equator
    assert web.xyz_zoom(equator, 156543.0 / 2 ** 10 + 1e-6) == 10


from test_qgis_plugin import plugin  # noqa: E402,F401,F811 - the plugin fixture (SRMFPlugin on the test iface)


def test_segment_with_srmf_on_a_web_layer_segments_the_part_the_map_shows(plugin,  # noqa: F811
                                                                          qgis_iface, tiles, serve, tmp_path,
                                                                          monkeypatch, clean_project):
    """The context menu's one-click *Segment with SRMF* on an XYZ layer: a web layer covers the world, so the
    run takes the map's visible extent; the class raster (in Documents/SRMF: a web layer has no folder) is
    on the level-18 tile grid and is added to the project."""
    from qgis.PyQt.QtCore import QStandardPaths
    from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle
    from srmf_qgis import tasks
    from srmf_qgis_testing import wait_for

    class Documents:  # Documents/SRMF under tmp_path, not the user's own
        StandardLocation = QStandardPaths.StandardLocation

        @staticmethod
        def writableLocation(location):  # noqa: N802
            return str(tmp_path)

    monkeypatch.setattr(tasks, "QStandardPaths", Documents)
    server = serve(tiles["dir"])
    layer = _xyz_layer(server.port)
    qgis_iface.setActiveLayer(layer)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    e = tiles["extent"]
    canvas.setExtent(QgsRectangle(e[0], (e[1] + e[3]) / 2, (e[0] + e[2]) / 2, e[3]))  # the north-west quarter
    canvas.refresh()
    said = []
    monkeypatch.setattr(plugin, "_message", lambda text, *a, **k: said.append(text))
    plugin.layer_actions["segment"].trigger()
    assert len(plugin.jobs) == 1, said
    job = plugin.jobs[0]
    wait_for(lambda: job.done and getattr(job, "layer", None) is not None or (job.done and not job.ok),
             what="the segmentation task")
    assert job.ok, job.error
    out = Path(job.results["OUTPUT"])
    assert out.parent == tmp_path / "SRMF" and out.name == "Adelaide_tiles_srmf_classes.tif"
    gt, size, epsg = _grid(out)
    assert epsg == "3857" and gt[1] == pytest.approx(RES)
    assert abs((gt[0] + HALF) / RES - round((gt[0] + HALF) / RES)) < 1e-6  # on the tile grid
    shown = canvas.extent()  # what the map shows (QGIS widens it to the canvas's shape): the area segmented
    x1, y0 = gt[0] + size[0] * gt[1], gt[3] + size[1] * gt[5]
    for a, b in ((gt[0], shown.xMinimum()), (x1, shown.xMaximum()), (y0, shown.yMinimum()), (gt[3], shown.yMaximum())):
        assert abs(a - b) <= RES, (a, b)
    assert job.layer.renderer().type() == "paletted"
