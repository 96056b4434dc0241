"""vLLM's `vllm.general_plugins` entry point (pyproject.toml): registers sgl's architectures with vLLM's
`ModelRegistry`, lazily by "module:Class", so vLLM imports models.py only when a run selects one of them
(`hf_overrides={"architectures": [...]}`), and arms vLLM's engine processes to end with their parent
(processes.py). vLLM calls this in every process it spawns; it is cheap and idempotent, and replaces none of vLLM's
own classes. On a vLLM release sgl was not tested on it registers nothing: sgl's backend refuses that release in one
line before vLLM starts (compat.check_vllm), and vLLM's own runs are left alone rather than broken by a plugin whose
vLLM internals may have moved."""

from __future__ import annotations

# sgl's architecture -> the in-tree model type it subclasses (the checkpoint's `model_type`).
ARCHITECTURES = {
    "SglQwen2VLForConditionalGeneration": "qwen2_vl",
    "SglQwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "SglQwen3VLForConditionalGeneration": "qwen3_vl",
}
MODULE = "sgl_cli.engine.backends.vllm.models"


def register() -> None:
    import vllm

    from .compat import in_range

    if not in_range(str(getattr(vllm, "__version__", ""))):
        return
    from vllm import ModelRegistry

    from .processes import arm, arm_forked

    arm()  # this process, if it is vLLM's engine core or a worker
    arm_forked()  # those vLLM forks from here on, which do not call plugins again

    known = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        if arch not in known:
            ModelRegistry.register_model(arch, f"{MODULE}:{arch}")
