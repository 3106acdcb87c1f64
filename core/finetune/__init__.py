"""The finetune command: SRMF training on the analyst's labelled rasters or polygons (data sources, MARS,
SRR-TA, the sampler, the training loop, checkpoints, distributed runs, the optional contrastive term)."""
