"""The engine as the LLM step drives it: trtbuild_runtime's EngineLoop or transformers' continuous
batching, behind one interface, so the Triton model never asks which one runs.

Both run their step loop on a thread of their own; the model only submits, cancels and collects
results (everything produced since the last call, the newest per request), so a slow client can
never hold a step back.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable

from trtbuild_runtime.backend import hf_engine
from trtbuild_runtime.backend.sampling import engine_sampling, sampling_kwargs
from trtbuild_runtime.config import EngineConfig, read_hf_config, resolve_device


@dataclasses.dataclass(frozen=True)
class Generation:
    """One request's generation settings, validated by the model before it reaches an engine."""

    max_tokens: int
    min_tokens: int
    end_id: int
    logprobs: bool
    sampling: dict[str, Any]  # temperature, top_k, top_p, seed as the request sent them (None: absent)


class TrtbuildEngine:
    """trtbuild_runtime (the Llama family): paged KV, CUDA graphs, prefix reuse, speculation."""

    name = "trtbuild"
    per_request_sampling = True

    def __init__(self, params: dict[str, str], max_batch_size: int, max_seq_len: int):
        from trtbuild_runtime import EngineLoop, LLMEngine

        device = resolve_device(params["device"])
        self.config = EngineConfig.from_parameters(
            params, model=params["checkpoint_dir"], device=device, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
            kv_cache_num_blocks=int(params["kv_cache_num_blocks"]) if device == "cpu" else None)
        self.vocab_size = int(read_hf_config(params["checkpoint_dir"])["vocab_size"])
        self.loop = EngineLoop(LLMEngine(self.config)).start()

    def describe(self) -> str:
        r, c = self.loop.engine.runner, self.config
        return (f"trtbuild_runtime: {r.num_blocks} KV blocks of {c.kv_cache_page_size} tokens ({r.kv_dtype}) on {r.device} "
                f"({r.dtype}, quantization {r.quantization}), speculative {c.speculative_decoding_mode}, "
                f"CUDA graphs for {sorted(r.graphs)}")

    def add(self, request_id: str, prompt: list[int], g: Generation) -> None:
        from trtbuild_runtime import SamplingParams

        params = SamplingParams(max_tokens=g.max_tokens, min_tokens=g.min_tokens, end_ids=(g.end_id,), logprobs=g.logprobs,
                                **engine_sampling(**g.sampling))
        self.loop.add_request(request_id, prompt, params)  # validated here: a bad request never joins

    def cancel(self, request_id: str) -> None:
        self.loop.cancel_request(request_id)

    def results(self, timeout: float) -> Iterable:
        return self.loop.get_results(timeout=timeout)

    def alive(self) -> bool:
        return self.loop.is_running()

    def reused_blocks(self, result) -> int:
        return result.cached_tokens // self.config.kv_cache_page_size

    @property
    def stats(self) -> dict[str, float]:
        return self.loop.engine.stats

    def stall(self) -> None:
        """Fault injection: the step loop blocks as a wedged kernel or deadlock would (health tests)."""
        self.loop.inbox.put(("stall",))
        self.loop.wake.set()

    def stop(self) -> None:
        self.loop.stop(block=True, timeout=10)


class TransformersEngine:
    """transformers' continuous batching, for the architectures trtbuild_runtime does not run."""

    name = "transformers"

    def __init__(self, params: dict[str, str], max_batch_size: int, max_seq_len: int, eos_token_id: int, pad_token_id: int):
        self.model = hf_engine.load_model(params["checkpoint_dir"], params["dtype"], params["device"],
                                          params.get("quantization", "none"))
        self.vocab_size = self.model.config.vocab_size
        max_input_len = int(params["max_input_len"])
        self.manager, self.per_request_sampling, self.dropped = hf_engine.continuous_batching(
            self.model, eos_token_id=eos_token_id, pad_token_id=pad_token_id, max_input_len=max_input_len,
            max_output_len=max_seq_len - max_input_len, page_size=int(params["kv_cache_page_size"]),
            num_blocks=int(params["kv_cache_num_blocks"]),
            free_gpu_mem_fraction=float(params["kv_cache_free_gpu_mem_fraction"]))
        self.stalled = False

    def describe(self) -> str:
        ignored = f"; this transformers version ignores {self.dropped}" if self.dropped else ""
        return f"transformers continuous batching on {self.model.device}{ignored}"

    def add(self, request_id: str, prompt: list[int], g: Generation) -> None:
        sampling = dict(g.sampling)
        end_id = g.end_id
        if g.min_tokens >= g.max_tokens:
            end_id = -1  # every request generates exactly max_tokens: the benchmark setting
        elif g.min_tokens > 0:
            raise ValueError("min_tokens must be 0 or >= max_tokens with the transformers engine")
        seed = sampling.pop("seed")
        kwargs = sampling_kwargs(self.per_request_sampling, self.vocab_size, **sampling)
        if kwargs.get("top_k", 1) != 1 and seed is not None:
            raise ValueError("seed cannot be honoured for sampled requests by the transformers engine: it shares one generator")
        self.manager.add_request(prompt, request_id=request_id, max_new_tokens=g.max_tokens, streaming=True,
                                 eos_token_id=end_id, **kwargs)

    def cancel(self, request_id: str) -> None:
        self.manager.cancel_request(request_id)

    def results(self, timeout: float) -> Iterable:
        if self.stalled:
            time.sleep(timeout)
            return []
        result = self.manager.get_result(timeout=timeout)
        return [] if result is None else [result]

    def alive(self) -> bool:
        status = getattr(self.manager, "background_thread_status", None)
        return self.manager.is_running() and getattr(status, "fatal_error", None) is None

    def reused_blocks(self, result) -> int:
        return 0  # no prefix cache here

    @property
    def stats(self) -> dict[str, float]:
        return {}

    def stall(self) -> None:
        self.stalled = True  # results stop arriving, as with a wedged step loop

    def stop(self) -> None:
        self.manager.stop(block=True, timeout=10)
        self.model.destroy_cached_continuous_batching_manager()


def open_engine(params: dict[str, str], max_batch_size: int, max_seq_len: int, tokenizer):
    """The engine `trtbuild repo` chose (parameter `engine`; trtbuild.json says why)."""
    if params.get("engine", "transformers") == "trtbuild":
        return TrtbuildEngine(params, max_batch_size, max_seq_len)
    return TransformersEngine(params, max_batch_size, max_seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id)
