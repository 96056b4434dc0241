"""Loading one model of a pair: the transformers backend's loaders (`backends/transformers.py`), named here too."""

from ..backends.transformers import (BNB_BLOCK, NOT_QUANTIZED, LoadedModel,  # noqa: F401
                                     device_map_for, finish, from_arch, from_memory, load_model, looks_like_path,
                                     quantization_config, quantize_in_memory, resolve_path)
