"""trtbuild's own LLM engine for the Llama family: paged KV cache, continuous batching, CUDA graphs.

One concept per module: `config` (what the engine is built with, and which checkpoints it runs),
`sequence` (one request and its sampling parameters), `block_manager` (the paged KV pool's
bookkeeping and prefix reuse), `scheduler` (which sequences run each step), `model_runner`
(tensors in, tokens out, CUDA graphs), `attention` and `kernels` (paged attention: torch and
Triton), `sampler`, `models/` (the network and its weight loading) and `engine` (the step loop
and its background thread).

The generated Triton repository carries a copy of this package, so it stays self-contained.
Names are imported lazily: `trtbuild_runtime.config` is read by `trtbuild repo` without torch.
"""

import importlib

_EXPORTS = {
    "EngineConfig": "config", "UnsupportedModel": "config", "check_supported": "config",
    "EngineLoop": "engine", "LLMEngine": "engine", "RequestOutput": "engine",
    "SamplingParams": "sequence", "FinishReason": "sequence",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trtbuild_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trtbuild_runtime.{_EXPORTS[name]}"), name)
