"""Backends for the large model other than transformers (the engine's own, in core/). Each lives in its own
package and imports its engine only when used: `vllm` (vLLM's offline `LLM` with sgl's model plugin)."""
