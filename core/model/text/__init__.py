"""Text-visual fusion's fixed text bank (DESIGN.md, method 3): concept prompts, frozen text encoders
(MiniLM, OpenCLIP) and the cached, L2-normalised N x D bank."""
