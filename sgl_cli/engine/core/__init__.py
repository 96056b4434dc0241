"""The inference core: loading models, the transformers seam, generation, importance capture, pruning, the Engine."""
