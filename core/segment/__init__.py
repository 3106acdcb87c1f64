"""The segment command: a raster in, a styled class raster (and probabilities) out, streamed window
by window over the raster with the shared sliding-window floor (core.windows)."""
