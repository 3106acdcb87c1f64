"""The SRMF engine: network, model file, text bank and streaming segmentation.

Runs in its own Python process (torch, numpy, GDAL); never imports qgis or Qt.
"""
__version__ = "0.1.0"
