"""``python -m core pretrain``: self-supervised pretraining of a model's encoder on unlabelled rasters
(SimCLR, and GraSS's gradient-guided sampling on top of it)."""
