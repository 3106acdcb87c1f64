"""The findclass command (class discovery from a few examples, CAT's cold-start targeting, arXiv 2308.02844):
example polygons -> prototypes -> a relevance raster and ranked candidates; the hand-off to fine-tuning."""
