"""transformers' continuous batching as the LLM step's engine, for the architectures trtbuild_runtime
does not run; and the sampling conventions both engines share (TensorRT-LLM's).

Free of Triton imports, so benchmarks and tests drive exactly what the server runs.
"""

import inspect

import torch
from torch import nn

from trtbuild_runtime.config import resolve_device
from trtbuild_runtime.quantization import Fp8Linear

def quantize_fp8(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Swap every Linear (but the output head) for the runtime's Fp8Linear; returns how many were swapped."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not any(name.endswith(s) for s in skip)
               and module.in_features % 16 == 0 and module.out_features % 16 == 0]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, Fp8Linear.from_linear(module))
    return len(targets)


def load_model(checkpoint: str, dtype: str, device: str, quantization: str = "none"):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model = model.to(resolve_device(device)).eval()
    if quantization == "fp8":
        quantize_fp8(model)
    elif quantization not in ("none", ""):
        raise ValueError(f"unknown quantization '{quantization}' for the transformers runtime")
    return model


def supported_options(config_class, options: dict) -> tuple[dict, list]:
    """Keep the options this transformers version knows; `page_size` was `block_size` before 5.2x."""
    known = set(inspect.signature(config_class).parameters)
    if "page_size" not in known and "block_size" in known:
        options["block_size"] = options.pop("page_size")
    dropped = sorted(set(options) - known)
    return {k: v for k, v in options.items() if k in known}, dropped


def continuous_batching(model, *, eos_token_id: int, pad_token_id: int, max_input_len: int, max_output_len: int,
                        page_size: int, num_blocks: int, free_gpu_mem_fraction: float):
    """A started ContinuousBatchingManager, whether requests can sample, and the options dropped.

    Sampling processors exist only when their defaults are not neutral, so the generation config
    carries non-neutral ones and every request passes its own values (top_k 1 for greedy): one
    running batch then mixes greedy and sampled requests.
    """
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    options = dict(page_size=page_size, per_request_processors=True, return_logprobs=True)
    if model.device.type == "cpu":
        options.update(num_blocks=num_blocks, max_batch_tokens=max(256, max_input_len))
    else:
        options.update(max_memory_percent=free_gpu_mem_fraction)
    options, dropped = supported_options(ContinuousBatchingConfig, options)
    per_request = bool(options.get("per_request_processors"))
    sampling = dict(do_sample=True, temperature=0.5, top_k=50, top_p=0.9) if per_request else dict(do_sample=False)
    generation = GenerationConfig(max_new_tokens=max_output_len, eos_token_id=eos_token_id,
                                  pad_token_id=pad_token_id, **sampling)
    manager = model.init_continuous_batching(generation_config=generation,
                                             continuous_batching_config=ContinuousBatchingConfig(**options))
    manager.start()
    return manager, per_request, dropped
