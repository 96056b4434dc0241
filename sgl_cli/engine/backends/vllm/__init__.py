"""The large model on vLLM: `VllmLarge` (large.py) runs vLLM's offline `LLM` with sgl's model plugin (plugin.py
registers models.py's architectures through vLLM's `vllm.general_plugins` entry point), so the large model answers
from the visual tokens sgl kept, with their original M-RoPE positions. Importing this package does not import vLLM;
making a `VllmLarge` does."""

from .compat import IncompatibleVllm
from .large import (FAMILIES, LargeReply, LargeRequest, Offers, Rendered, UnsupportedFamily, VllmLarge, VllmSettings,
                    VllmUnavailable, check_family, import_vllm)

__all__ = ["FAMILIES", "IncompatibleVllm", "LargeReply", "LargeRequest", "Offers", "Rendered", "UnsupportedFamily",
           "VllmLarge", "VllmSettings", "VllmUnavailable", "check_family", "import_vllm"]
