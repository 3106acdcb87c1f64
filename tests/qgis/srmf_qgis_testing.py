"""Helpers and fixtures of the QGIS and UI tests: real QGIS 3.22 (pytest-qgis, offscreen), the SRMF
provider, the real data of ../shared/data, and the repository's .venv as the engine interpreter.
``tests/qgis/conftest.py`` and ``tests/ui/conftest.py`` import the fixtures from here.

These tests run in their own pytest process, never together with tests/core (torch and QGIS in one
process crash): ``make test-qgis``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
ARTIFACTS = ROOT / "tests" / "artifacts"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

ADELAIDE = DATA / "openearthmap_adelaide" / "adelaide_2.tif"          # EPSG:4326, 1024 x 1024 RGB
OSBS = DATA / "deepforest_neon_osbs" / "OSBS_029.tif"                 # EPSG:32617, 400 x 400 RGB, nodata 255
ATLANTA = DATA / "solaris_spacenet_atlanta" / "sample_geotiff.tif"    # EPSG:32616, 900 x 900 uint16 pan
ATLANTA_BUILDINGS = DATA / "solaris_spacenet_atlanta" / "geotiff_labels.geojson"  # 43 building polygons
DUBAI_IMAGE = DATA / "dubai_hitl_aerial" / "tile_1" / "images" / "image_part_001.jpg"  # 797 x 644 RGB
DUBAI_MASK = DATA / "dubai_hitl_aerial" / "tile_1" / "masks" / "image_part_001.png"    # RGB-coded mask
# The Dubai mask colours (SOURCES.md) -> the default model's class ids; anything else -> 255 (ignore).
DUBAI_COLOURS = {(60, 16, 152): 0, (132, 41, 246): 1, (110, 193, 228): 2, (254, 221, 58): 3, (226, 169, 41): 4}
MODEL_CLASSES = ["building", "land", "road", "vegetation", "water"]
MODEL_COLOURS = ["#3C1098", "#8429F6", "#6EC1E4", "#FEDD3A", "#E2A929"]  # resources/models/README.md

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    missing = [p for p in (ADELAIDE, OSBS, ATLANTA, ATLANTA_BUILDINGS, DUBAI_IMAGE, DUBAI_MASK) if not p.exists()]
    if missing:
        raise pytest.UsageError(f"The real test data is missing (../shared/data): {missing}")
    if not (ROOT / "resources" / "models" / "default.srmf").exists():
        raise pytest.UsageError("The embedded default model is missing: run `make default-model`.")
    # a deprecated QGIS call in the plugin fails the run (QGIS 4 removes what 3.x deprecates)
    config.addinivalue_line("filterwarnings", r"error::DeprecationWarning:srmf_qgis(\..*)?")
    expected = os.environ.get("SRMF_EXPECT_QGIS")
    if expected:  # make test runs this suite on two QGIS versions: fail loudly when it imported another
        from qgis.core import Qgis

        if not Qgis.QGIS_VERSION.startswith(expected + "."):
            raise pytest.UsageError(f"SRMF_EXPECT_QGIS={expected} but this Python imports QGIS {Qgis.QGIS_VERSION} "
                                    f"(from {Path(sys.modules['qgis'].__file__).parent})")


def pytest_report_header(config):
    from qgis.core import Qgis

    return f"QGIS {Qgis.QGIS_VERSION} from {Path(sys.modules['qgis'].__file__).parent}"


@pytest.fixture(scope="session", autouse=True)
def canvas_not_drawn(qgis_iface):
    """The test interface's map canvas is never drawn: the tests read its extent (Segment visible extent) and
    render pictures with their own map settings (srmf_qgis.quicklook.render_map). A drawing canvas only adds
    render threads racing the layers the tests add and clear — QGIS 3.40 crashed once in such a race
    (in processEvents while a one-click task finished; not reproduced on 3.22)."""
    canvas = qgis_iface.mapCanvas()
    canvas.setRenderFlag(False)
    canvas.setParallelRenderingEnabled(False)
    yield canvas


@pytest.fixture(scope="session", autouse=True)
def engine_interpreter():
    """The repository's .venv runs the engine (through SRMF_PYTHON); QGIS settings start clean."""
    from qgis.core import QgsSettings

    old = os.environ.get("SRMF_PYTHON")
    os.environ["SRMF_PYTHON"] = str(VENV_PYTHON)
    s = QgsSettings()
    for key in ("srmf/python", "srmf/last_model", "srmf/device"):
        s.remove(key)
    yield str(VENV_PYTHON)
    if old is None:
        os.environ.pop("SRMF_PYTHON", None)
    else:
        os.environ["SRMF_PYTHON"] = old


@pytest.fixture(autouse=True)
def clean_srmf_settings():
    """Every test starts without a remembered model, device or interpreter and leaves none behind, so a
    fine-tune in one test cannot change which model a later test segments with (the engine is found
    through SRMF_PYTHON, set for the session above)."""
    from qgis.core import QgsSettings

    keys = ("srmf/python", "srmf/last_model", "srmf/device", "srmf/torch_variant")
    for key in keys:
        QgsSettings().remove(key)
    yield
    for key in keys:
        QgsSettings().remove(key)


@pytest.fixture(scope="session")
def provider(qgis_processing):
    """The SRMF provider registered in the Processing registry (and Processing's own providers)."""
    from qgis.core import QgsApplication

    from srmf_qgis.provider import SRMFProvider

    registry = QgsApplication.processingRegistry()
    existing = registry.providerById("srmf")
    if existing is not None:
        yield existing
        return
    p = SRMFProvider()
    assert registry.addProvider(p)
    yield p
    if registry.providerById("srmf") is p:
        registry.removeProvider(p)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """tests/artifacts/ (the README's screenshots come from the main QGIS, 3.40); tests/artifacts/qgis-<x.y>/ when
    another QGIS runs the suite (make test-qgis-322), so that run does not overwrite them."""
    from qgis.core import Qgis

    version = ".".join(Qgis.QGIS_VERSION.split(".")[:2])
    folder = ARTIFACTS if version == os.environ.get("SRMF_MAIN_QGIS", "3.40") else ARTIFACTS / f"qgis-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def make_feedback(cancel_after_progress: bool = False):
    from qgis.core import QgsProcessingFeedback

    class Feedback(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.infos, self.warnings, self.errors, self.commands, self.progress = [], [], [], [], []
            self.metrics = []
            self.worker_pid = None

        def pushInfo(self, info):  # noqa: N802
            self.infos.append(info)
            super().pushInfo(info)

        def pushWarning(self, warning):  # noqa: N802
            self.warnings.append(warning)
            super().pushWarning(warning)

        def reportError(self, error, fatalError=False):  # noqa: N802,N803
            self.errors.append(error)
            super().reportError(error, fatalError)

        def pushCommandInfo(self, info):  # noqa: N802
            self.commands.append(info)
            super().pushCommandInfo(info)

        def setProgress(self, p):  # noqa: N802
            self.progress.append(p)
            super().setProgress(p)
            if cancel_after_progress and p > 0:
                self.cancel()

        def srmf_on_start(self, pid):
            self.worker_pid = pid

        def srmf_on_metrics(self, msg):
            self.metrics.append(msg)

    return Feedback()


def run_alg(alg_id: str, params: dict, feedback=None, context=None):
    import processing

    return processing.run(alg_id, params, feedback=feedback or make_feedback(), context=context)


def wait_for(predicate, timeout: float = 600.0, what: str = "condition"):
    """Process Qt events until ``predicate()`` is true (background tasks deliver their results)."""
    from qgis.PyQt.QtCore import QCoreApplication

    t0 = time.monotonic()
    while not predicate():
        QCoreApplication.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"waited {timeout} s for {what}")


def process_group_members(pgid: int):
    """PIDs of live processes in process group ``pgid`` (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d.name))
    return out


def dubai_label_raster(path: Path) -> Path:
    """The Dubai RGB mask as a class raster (ids of the default model, 255 = unlabelled)."""
    import numpy as np
    from osgeo import gdal

    ds = gdal.Open(str(DUBAI_MASK))
    rgb = np.stack([ds.GetRasterBand(i).ReadAsArray() for i in (1, 2, 3)], axis=-1).astype(np.int32)
    ds = None
    key = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
    out = np.full(key.shape, 255, dtype=np.uint8)
    for (r, g, b), cid in DUBAI_COLOURS.items():
        out[key == r * 65536 + g * 256 + b] = cid
    drv = gdal.GetDriverByName("GTiff")
    dst = drv.Create(str(path), out.shape[1], out.shape[0], 1, gdal.GDT_Byte)
    band = dst.GetRasterBand(1)
    band.WriteArray(out)
    band.SetNoDataValue(255)
    band = None
    dst = None
    return path


@pytest.fixture(scope="session")
def dubai_labels(tmp_path_factory) -> Path:
    return dubai_label_raster(tmp_path_factory.mktemp("dubai") / "image_part_001_classes.tif")


@pytest.fixture(scope="session")
def atlanta_polygon_labels(tmp_path_factory, qgis_app) -> Path:
    """Real SpaceNet building polygons plus the rest of the image as one "other" polygon, field "class"."""
    from qgis.core import (QgsFeature, QgsField, QgsGeometry, QgsRasterLayer, QgsVectorFileWriter,
                           QgsVectorLayer, QgsCoordinateTransformContext)
    from srmf_qgis.compat import field_type

    buildings = QgsVectorLayer(str(ATLANTA_BUILDINGS), "buildings", "ogr")
    raster = QgsRasterLayer(str(ATLANTA), "atlanta", "gdal")
    assert buildings.isValid() and raster.isValid()
    mem = QgsVectorLayer(f"Polygon?crs={buildings.crs().authid()}", "labels", "memory")
    mem.dataProvider().addAttributes([QgsField("class", field_type("String"))])
    mem.updateFields()
    geoms = [f.geometry() for f in buildings.getFeatures()]
    feats = []
    for g in geoms:
        f = QgsFeature(mem.fields())
        f.setGeometry(g)
        f.setAttributes(["building"])
        feats.append(f)
    rest = QgsGeometry.fromRect(raster.extent()).difference(QgsGeometry.unaryUnion(geoms))
    f = QgsFeature(mem.fields())
    f.setGeometry(rest)
    f.setAttributes(["other"])
    feats.append(f)
    mem.dataProvider().addFeatures(feats)
    path = tmp_path_factory.mktemp("atlanta") / "atlanta_labels.gpkg"
    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName = "GPKG"
    err = QgsVectorFileWriter.writeAsVectorFormatV3(mem, str(path), QgsCoordinateTransformContext(), opts)
    assert err[0] == QgsVectorFileWriter.NoError, err
    return path


@pytest.fixture(scope="session")
def dubai_prediction(provider, tmp_path_factory) -> Path:
    """The default model's prediction on the real Dubai tile (shared by the evaluate tests)."""
    out = tmp_path_factory.mktemp("dubai_pred") / "dubai_pred.tif"
    run_alg("srmf:segment", {"INPUT": str(DUBAI_IMAGE), "TILE_SIZE": 256, "STRIDE": 256, "OUTPUT": str(out),
                             "OUTPUT_AREAS": None})
    assert out.exists()
    return out


@pytest.fixture(scope="session")
def adelaide_segmented(provider, tmp_path_factory) -> dict:
    """srmf:segment on the real EPSG:4326 raster (shared by the CRS test and the map screenshot)."""
    folder = tmp_path_factory.mktemp("adelaide")
    fb = make_feedback()
    res = run_alg("srmf:segment", {"INPUT": str(ADELAIDE), "TILE_SIZE": 512, "STRIDE": 512,
                                   "OUTPUT": str(folder / "adelaide_classes.tif"), "OUTPUT_AREAS": "TEMPORARY_OUTPUT"}, fb)
    return {"results": res, "feedback": fb, "folder": folder}


@pytest.fixture(scope="session")
def osbs_segmented(provider, tmp_path_factory) -> dict:
    """srmf:segment on the real UTM raster with every output (shared by tests that need a result)."""
    folder = tmp_path_factory.mktemp("osbs")
    fb = make_feedback()
    res = run_alg("srmf:segment", {
        "INPUT": str(OSBS), "TILE_SIZE": 256, "STRIDE": 256, "OUTPUT": str(folder / "osbs_classes.tif"),
        "OUTPUT_PROBABILITIES": str(folder / "osbs_probabilities.tif"),
        "OUTPUT_POLYGONS": str(folder / "osbs_polygons.gpkg"), "OUTPUT_AREAS": "TEMPORARY_OUTPUT"}, fb)
    return {"results": res, "feedback": fb, "folder": folder}


def engine_cli(*args, timeout=600) -> dict:
    """Run the engine CLI directly (not through QGIS) and return its result message."""
    import json

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([str(VENV_PYTHON), "-m", "core", *map(str, args), "--json"], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=timeout)
    msgs = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    results = [m for m in msgs if m.get("type") == "result"]
    assert results, f"engine failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    return results[-1]


@pytest.fixture
def clean_project(qgis_iface):
    from qgis.core import QgsProject

    QgsProject.instance().clear()
    yield QgsProject.instance()
    QgsProject.instance().clear()


def have_make() -> bool:
    return shutil.which("make") is not None
