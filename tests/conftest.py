"""Shared fixtures: paths to the real data in ../shared/data and seeded random model files."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

ADELAIDE = DATA / "openearthmap_adelaide" / "adelaide_2.tif"     # EPSG:4326, 3-band uint8
OSBS = DATA / "deepforest_neon_osbs" / "OSBS_029.tif"            # EPSG:32617, 3-band uint8, nodata 255
ATLANTA = DATA / "solaris_spacenet_atlanta" / "sample_geotiff.tif"  # EPSG:32616, 1-band uint16, nodata 0
REAL_GEOTIFFS = [ADELAIDE, OSBS, ATLANTA]

DUBAI_CLASSES = [("building", "#3C1098"), ("land", "#8429F6"), ("road", "#6EC1E4"),
                 ("vegetation", "#FEDD3A"), ("water", "#E2A929")]


def read_band(path, band: int = 1):
    """A band of a raster as a numpy array (the dataset is kept alive while reading: GDAL < 3.8 frees
    it under a band obtained from a temporary ``gdal.Open(...)`` and crashes)."""
    from osgeo import gdal

    ds = gdal.Open(str(path))
    arr = ds.GetRasterBand(band).ReadAsArray()
    ds = None
    return arr


def engine_env() -> dict:
    """Environment for running ``python -m core`` in a subprocess from the repository root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def make_random_model(path: Path, backbone: str = "efficientnet_lite0", seed: int = 0, n_concepts: int = 12,
                      dim: int = 32, text_fusion: bool = True) -> Path:
    """A seeded random-initialised SRMF model file of the real architecture (no downloads)."""
    import torch

    from core.model.modelfile import save_model
    from core.model.network import SRMFNet, architecture_config

    torch.manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(n_concepts, dim), dim=1) if text_fusion else None
    model = SRMFNet(backbone, len(DUBAI_CLASSES), text_bank=bank)
    # Random BN statistics so that eval-mode outputs are not trivially flat.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    classes = [{"id": i, "name": n, "colour": c, "prompt": f"A satellite image of {n}"}
               for i, (n, c) in enumerate(DUBAI_CLASSES)]
    header = {
        "architecture": architecture_config(model),
        "classes": classes,
        "text_encoder": {"id": "random-test", "dim": dim} if text_fusion else None,
        "text_bank": {"prompts": [f"A satellite image of concept {i}" for i in range(n_concepts)]} if text_fusion else None,
        "provenance": {"untrained": True, "note": f"random test model, seed {seed}"},
    }
    return save_model(path, model, header)


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("models") / "random_lite0.srmf")


@pytest.fixture(scope="session")
def random_mit_model(tmp_path_factory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("models") / "random_mitb0.srmf", backbone="mit_b0", seed=1)
