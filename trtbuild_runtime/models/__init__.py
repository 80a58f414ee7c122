"""The networks the engine runs: the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2)."""

from trtbuild_runtime.models.llama import LlamaForCausalLM, load_model

__all__ = ["LlamaForCausalLM", "load_model"]
