"""The inference primitives: the transformers seam, processors, generation, importance capture, pruning."""
