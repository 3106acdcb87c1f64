"""The evaluate command: accuracy assessment of a class raster against a reference class raster or
polygons (confusion matrix, OA, kappa, IoU, mIoU), streamed strip by strip, with CSV/JSON reports."""
