"""sgl: batch inference with vision-language models, made cheap by small-VLM guidance and early exit."""

__version__ = "0.2.0"
