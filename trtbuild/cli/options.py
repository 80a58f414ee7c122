"""Option groups several commands share, so `repo`, `compose` and the rest spell each setting once.

Each build option is the BuildSpec field of the same name (trtbuild.spec), whose default is the
engine's (trtbuild_runtime.config.ENGINE_DEFAULTS): the flag, the spec, config.pbtxt and the engine
agree on one name and one default.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import click

from trtbuild.deploy.openai import FRONTENDS
from trtbuild.precisions import KV_CACHE_DTYPES
from trtbuild.repository.serving import PROFILES, TIMEOUT_ACTIONS
from trtbuild.spec import DTYPES, LLM_ENGINES, SPECULATIVE_MODES, BuildSpec, KVCacheSpec
from trtbuild_runtime.config import QUANTIZATIONS

_SPEC = {f.name: f.default for f in dataclasses.fields(BuildSpec)}
_KV = {f.name: f.default for f in dataclasses.fields(KVCacheSpec)}


def _apply(options, f):
    return functools.reduce(lambda acc, opt: opt(acc), reversed(options), f)


def build_options(f):
    """Options every LLM build shares; one place so `repo`, `engine` and `compose` agree."""
    options = [
        click.option("--max-batch-size", type=int, default=_SPEC["max_batch_size"], show_default=True, help="Largest in-flight batch."),
        click.option("--max-input-len", type=int, default=_SPEC["max_input_len"], show_default=True, help="Longest prompt, in tokens."),
        click.option("--max-output-len", type=int, default=_SPEC["max_output_len"], show_default=True, help="Most generated tokens."),
        click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default=_SPEC["dtype"], show_default=True),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--tokenizer-dir", type=click.Path(path_type=Path), default=None, help="Defaults to the checkpoint."),
        click.option("--kv-cache-page-size", type=int, default=_KV["page_size"], show_default=True, help="Tokens per KV-cache block."),
        click.option("--kv-cache-free-gpu-mem-fraction", type=float, default=_KV["free_gpu_mem_fraction"], show_default=True),
        click.option("--exclude-input-in-output/--include-input-in-output", default=True, show_default=True),
        click.option("--quantization", type=click.Choice(QUANTIZATIONS), default=_SPEC["quantization"], show_default=True,
                     help="transformers runtime: fp8 runs the Linear layers on FP8 tensor cores (W8A8; compute "
                          "capability 8.9+). A ModelOpt FP8 checkpoint (trtbuild quantize --format hf) runs FP8 by itself."),
        click.option("--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES), default=_KV["dtype"], show_default=True,
                     help="KV-cache pages: auto (the model dtype, or FP8 where the checkpoint calibrated it), fp8 "
                          "(e4m3, half the bytes of 16-bit pages)."),
        click.option("--speculative-decoding-mode", type=click.Choice(SPECULATIVE_MODES), default="none", show_default=True,
                     help="ngram: prompt-lookup drafting verified in one step (greedy output unchanged)."),
        click.option("--max-draft-len", type=int, default=_SPEC["max_draft_len"], show_default=True, help="Draft tokens verified per step."),
        click.option("--max-matching-ngram-size", type=int, default=_SPEC["max_matching_ngram_size"], show_default=True,
                     help="Longest prompt suffix prompt lookup matches."),
        click.option("--text-env", type=click.Path(path_type=Path), default=None,
                     help="Python environment (EXECUTION_ENV_PATH) for the tokenizer models."),
        click.option("--llm-engine", type=click.Choice(LLM_ENGINES), default=_SPEC["llm_engine"], show_default=True,
                     help="transformers runtime: trtbuild's own engine (Llama family) or transformers' continuous batching."),
        click.option("--max-num-tokens", type=int, default=_SPEC["max_num_tokens"], show_default=True,
                     help="Token budget of one engine step; longer prefills are chunked."),
        click.option("--enable-kv-cache-reuse/--no-enable-kv-cache-reuse", default=False, show_default=True,
                     help="Reuse the KV blocks of shared prompt prefixes (prefix caching)."),
        click.option("--stream-interval-ms", type=float, default=_SPEC["stream_interval_ms"], show_default=True,
                     help="Streaming: at most one response per stream this often; tokens in between go together (0: no wait)."),
        click.option("--gpu-mem-gib", type=float, default=None,
                     help="Memory of the GPU the build is for (default: the visible one); repo refuses a build that cannot fit it."),
        click.option("--engine-stall-timeout-s", type=float, default=_SPEC["engine_stall_timeout_s"], show_default=True,
                     help="Health: an LLM engine with requests in flight and no progress for this long fails them and "
                          "new ones until the server is restarted."),
        click.option("--stream-max-tokens", type=int, default=_SPEC["stream_max_tokens"], show_default=True,
                     help="Streaming: at most this many tokens per response (0: all that accumulated; 1: one token each)."),
    ]
    return _apply(options, f)


SERVING_OPTION_NAMES = (
    "serving_profile", "max_queue_delay_us", "preferred_batch_size", "instances", "priority_levels",
    "default_priority_level", "max_queue_size", "queue_timeout_us", "timeout_action", "allow_timeout_override",
    "priority_queue_policy", "response_cache", "response_cache_bytes", "model_policy", "rate_limit_resource",
)


def serving_options(f):
    """The `trtbuild repo` options that make the ServingPolicy; a profile first, then overrides."""
    options = [
        click.option("--serving-profile", type=click.Choice(PROFILES), default=None,
                     help="Preset queueing/batching/caching policy (see trtbuild/repository/serving.py); options below override it."),
        click.option("--max-queue-delay-us", type=int, default=None, help="Dynamic batcher delay of the non-decoupled steps."),
        click.option("--preferred-batch-size", type=int, multiple=True, help="Preferred batch size (repeatable)."),
        click.option("--instances", type=int, default=None, help="Instances of each non-decoupled step."),
        click.option("--priority-levels", type=int, default=None, help="Request priority levels (1 is the highest)."),
        click.option("--default-priority-level", type=int, default=None, help="Level of requests that give none."),
        click.option("--max-queue-size", type=int, default=None, help="Queued requests per model before rejecting; 0: unbounded."),
        click.option("--queue-timeout-us", type=int, default=None, help="Longest queue wait before the timeout action; 0: none."),
        click.option("--timeout-action", type=click.Choice(TIMEOUT_ACTIONS, case_sensitive=False), default=None),
        click.option("--allow-timeout-override/--no-allow-timeout-override", default=None,
                     help="Let a request ask for a shorter queue timeout than the default."),
        click.option("--priority-queue-policy", multiple=True, metavar="LEVEL:key=value,...",
                     help="Queue policy of one priority level (repeatable)."),
        click.option("--response-cache/--no-response-cache", default=None,
                     help="Triton's response cache on the deterministic non-decoupled models."),
        click.option("--response-cache-bytes", type=int, default=None, help="Cache size `trtbuild serve` gives the server."),
        click.option("--model-policy", multiple=True, metavar="MODEL:key=value,...",
                     help="Per-model instances, response_cache, queue keys, resource.NAME=COUNT, limiter_priority (repeatable)."),
        click.option("--rate-limit-resource", multiple=True, metavar="NAME:COUNT",
                     help="Server total of a rate-limiter resource (repeatable)."),
    ]
    return _apply(options, f)


def pop_serving_options(options: dict[str, Any]) -> dict[str, Any]:
    """Remove the serving options from a command's keyword arguments (the rest build the spec)."""
    return {name: options.pop(name) for name in SERVING_OPTION_NAMES if name in options}


frontend_option = click.option(
    "--frontend", type=click.Choice(FRONTENDS), default="triton", show_default=True,
    help="openai: Triton's OpenAI-compatible frontend (port 9000, /v1/chat/completions, /v1/completions).")
