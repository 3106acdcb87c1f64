"""The findclass command (cold-start class discovery, arXiv 2308.02844 CAT transfer): example polygons ->
prototypes -> a relevance raster and ranked candidates; and the hand-off of reviewed candidates to fine-tuning."""
