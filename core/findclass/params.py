"""The parameters of findclass, their choices and defaults, and the names of its outputs: stated once here,
torch-free, so that the command line registers them without loading torch."""
from __future__ import annotations

CELL = 4
"""Pixels per feature cell: the SRMF head's maps are at stride 4."""
NODATA = -9999.0
"""Nodata value of the relevance raster (float32)."""
RELEVANCE_NAME = "relevance.tif"
CANDIDATES_NAME = "candidates.gpkg"
CANDIDATES_LAYER = "candidates"
META_LAYER = "srmf_findclass"
STATUSES = ("pending", "accepted", "rejected")
FEATURE_SPACES = ("fused", "embedding", "both")
MODES = ("max", "mean")
METHODS = ("cat", "prototype", "nn", "random")
DEFAULTS = {"clusters": 1, "top_n": 100, "patch": 64, "mode": "max", "features": "fused",
            "max_per_polygon": 400, "recall_target": 0.9, "min_points_per_cluster": 10,
            "min_cluster_share": 0.02, "n_init": 8, "center_windows": 8, "exclude_share": 0.5}
