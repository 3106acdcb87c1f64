"""The SRMF engine: one folder per command (segment, finetune, evaluate, findclass) over a shared floor
(files, device, classtable, metrics, windows, geo/, model/); runs in its own process, never imports qgis or Qt.
"""
__version__ = "0.1.0"
