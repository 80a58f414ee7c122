"""Served greedy generations vs transformers greedy generation of the reference checkpoint.

Each prompt is sent to the served model (ensemble or BLS, gRPC or HTTP, via trtbuild/clients/generate.py)
with greedy settings, and generated locally with `model.generate(do_sample=False)` on the original
checkpoint in fp32. Both texts are compared as text and as tokens; tokens are the texts re-encoded
with the same tokenizer, so identical texts always give identical tokens.

Metrics:
- `exact_match_rate`: fraction of prompts whose served text equals the reference text;
- `token_agreement`: matching tokens at the same position / the longer sequence's length, pooled over prompts;
- `prefix_agreement`: mean over prompts of (first divergence position / reference length);
- `first_divergence_mean` / `first_divergence_min`: token index of the first mismatch (the full
  length when the texts match);
- `logprob_delta_mean` / `logprob_delta_max`: |served log-prob - reference log-prob| of each
  generated token before the first divergence, reference log-probs taken from the raw logits.

A server that returns log-probs of its processed distribution (transformers' continuous batching,
trtbuild's fallback engine, does: greedy is top_k=1, so every log-prob is 0, or -log 2 / -log 3 where bf16 logits tie and top-k
keeps every tied token) would make the delta look large and wrong. When every served log-prob is
-log n for a whole n (0 included), the delta is reported as unavailable, with the reason.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

from trtbuild.errors import TrtbuildError
from trtbuild.clients.generate import GenerationError, generate

ZERO_LOGPROBS_NOTE = ("log-prob delta unavailable: the server returned only log-probs of 0 or -log n (it reports "
                      "log-probs of its processed greedy distribution, top_k=1, not of the model's raw distribution)")
NO_LOGPROBS_NOTE = "log-prob delta unavailable: the server returned no output_log_probs"


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    max_tokens: int = 32


def load_prompts(path: Path, *, max_tokens: int | None = None, limit: int | None = None) -> list[Prompt]:
    """JSON lines with `prompt` (required), `id` and `max_tokens`; `max_tokens` overrides every line."""
    path = Path(path)
    if not path.is_file():
        raise TrtbuildError(f"prompt file {path} does not exist", hint="pass --prompts FILE (JSON lines with a 'prompt' field)")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrtbuildError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise TrtbuildError(f"{path}:{n}: each line needs a non-empty string field 'prompt'")
        prompts.append(Prompt(str(row.get("id", n)), row["prompt"], int(max_tokens or row.get("max_tokens", 32))))
    if not prompts:
        raise TrtbuildError(f"prompt file {path} holds no prompts")
    return prompts[:limit] if limit else prompts


@dataclasses.dataclass
class Generation:
    text: str
    log_probs: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PromptComparison:
    id: str
    reference: str
    served: str
    exact: bool
    matching_tokens: int
    reference_tokens: int
    served_tokens: int
    first_divergence: int | None  # None: identical
    logprob_deltas: list[float]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def reference_generations(checkpoint: Path, prompts: list[Prompt], *, dtype: str = "float32",
                          add_special_tokens: bool = True,
                          progress: Callable[[int, int], None] | None = None) -> tuple[list[Generation], Any]:
    """Greedy generation with transformers, stopping at the tokenizer's EOS as the served preprocessing does."""
    import torch

    from trtbuild.quality.validate import load_hf_model, load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    model = load_hf_model(checkpoint, dtype=dtype)
    out = []
    for i, p in enumerate(prompts):
        ids = torch.tensor([tokenizer.encode(p.prompt, add_special_tokens=add_special_tokens)])
        with torch.inference_mode():
            result = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=p.max_tokens,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                output_logits=True, return_dict_in_generate=True,
            )
        new = result.sequences[0, ids.shape[1]:]
        logits = torch.stack(result.logits, dim=1)[0].double()
        logprobs = torch.log_softmax(logits, -1).gather(1, new[:, None])[:, 0].tolist()
        text = tokenizer.decode(new.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        out.append(Generation(text, logprobs))
        if progress:
            progress(i + 1, len(prompts))
    return out, tokenizer


def served_generations(url: str, prompts: list[Prompt], *, protocol: str = "grpc", model: str = "ensemble",
                       log_probs: bool = True, concurrency: int = 4,
                       progress: Callable[[int, int], None] | None = None) -> list[Generation]:
    """Greedy requests (top_k 1, no streaming, prompt excluded from the output), several in flight."""

    def one(p: Prompt) -> Generation:
        params: dict[str, Any] = {"top_k": 1, "exclude_input_in_output": True}
        if log_probs:
            params["return_log_probs"] = True
        r = generate(url, p.prompt, p.max_tokens, protocol=protocol, model=model, stream=False, **params)
        return Generation(r.text, r.output_log_probs)

    results: list[Generation | None] = [None] * len(prompts)
    with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
        futures = {pool.submit(one, p): i for i, p in enumerate(prompts)}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            try:
                results[futures[future]] = future.result()
            except GenerationError as e:
                raise GenerationError(f"prompt '{prompts[futures[future]].id}': {e}") from None
            if progress:
                progress(done, len(prompts))
    return [r for r in results if r is not None]


def compare_one(prompt: Prompt, reference: Generation, served: Generation, tokenizer, compare_logprobs: bool) -> PromptComparison:
    ref_ids = tokenizer.encode(reference.text, add_special_tokens=False)
    srv_ids = tokenizer.encode(served.text, add_special_tokens=False)
    matching = sum(a == b for a, b in zip(ref_ids, srv_ids))
    divergence = next((i for i, (a, b) in enumerate(zip(ref_ids, srv_ids)) if a != b), None)
    if divergence is None and len(ref_ids) != len(srv_ids):
        divergence = min(len(ref_ids), len(srv_ids))
    deltas = []
    if compare_logprobs:
        # served log-probs follow the served token ids; they line up with the reference only before a divergence
        agree = len(reference.log_probs) if divergence is None else min(divergence, len(reference.log_probs))
        n = min(agree, len(served.log_probs))
        deltas = [abs(s - r) for s, r in zip(served.log_probs[:n], reference.log_probs[:n])]
    return PromptComparison(prompt.id, reference.text, served.text, reference.text == served.text, matching,
                            len(ref_ids), len(srv_ids), divergence, deltas)


@dataclasses.dataclass
class OnlineMetrics:
    comparisons: list[PromptComparison]
    logprob_note: str | None

    def as_metrics(self) -> dict[str, float | None]:
        c = self.comparisons
        n = len(c)
        longest = sum(max(x.reference_tokens, x.served_tokens) for x in c)
        divergence = [x.first_divergence if x.first_divergence is not None else x.reference_tokens for x in c]
        deltas = [d for x in c for d in x.logprob_deltas]
        unavailable = self.logprob_note is not None or not deltas
        return {
            "prompts": n,
            "exact_match_rate": sum(x.exact for x in c) / n,
            "token_agreement": sum(x.matching_tokens for x in c) / longest if longest else 1.0,
            "prefix_agreement": sum(d / x.reference_tokens if x.reference_tokens else 1.0 for d, x in zip(divergence, c)) / n,
            "first_divergence_mean": sum(divergence) / n,
            "first_divergence_min": min(divergence),
            "logprob_delta_mean": None if unavailable else sum(deltas) / len(deltas),
            "logprob_delta_max": None if unavailable else max(deltas),
        }


def _uniform_over_ties(logprob: float) -> bool:
    """True for -log n, n = 1, 2, 3...: the probability of one of n tied tokens after top_k=1."""
    if math.isnan(logprob) or logprob > 1e-6 or logprob < -5:
        return False
    n = math.exp(-logprob)
    return abs(n - round(n)) < 1e-3


def compare(prompts: list[Prompt], reference: list[Generation], served: list[Generation], tokenizer,
            *, log_probs_requested: bool = True) -> OnlineMetrics:
    note = None
    if log_probs_requested:
        returned = [v for s in served for v in s.log_probs]
        if not returned:
            note = NO_LOGPROBS_NOTE
        elif all(_uniform_over_ties(v) for v in returned):
            note = ZERO_LOGPROBS_NOTE
        elif any(math.isnan(v) for v in returned):
            note = "log-prob delta unavailable: the server returned NaN log-probs"
    else:
        note = "log-probs not requested"
    comparisons = [compare_one(p, r, s, tokenizer, note is None) for p, r, s in zip(prompts, reference, served)]
    return OnlineMetrics(comparisons, note)


def served_dtype(url: str, protocol: str = "grpc", models: tuple[str, ...] = ("llm", "tensorrt_llm")) -> str | None:
    """The `dtype` parameter of the served LLM step's config, or None when the server does not say."""
    if protocol == "grpc":
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module
    client = client_module.InferenceServerClient(url)
    try:
        for name in models:
            try:
                config = client.get_model_config(name, **({"as_json": True} if protocol == "grpc" else {}))
            except Exception:  # tritonclient raises InferenceServerException for an unknown model
                continue
            config = config.get("config", config)
            value = (config.get("parameters", {}).get("dtype") or {}).get("string_value")
            if value:
                return value
        return None
    finally:
        client.close()


def validate_online(checkpoint: Path, url: str, prompts: list[Prompt], *, protocol: str = "grpc",
                    model: str = "ensemble", log_probs: bool = True, concurrency: int = 4,
                    add_special_tokens: bool = True,
                    progress: Callable[[str], None] | None = None) -> OnlineMetrics:
    say = progress or (lambda _msg: None)
    served = served_generations(url, prompts, protocol=protocol, model=model, log_probs=log_probs,
                                concurrency=concurrency,
                                progress=lambda i, n: say(f"served {i}/{n} prompts from {model} at {url}"))
    reference, tokenizer = reference_generations(
        checkpoint, prompts, add_special_tokens=add_special_tokens,
        progress=lambda i, n: say(f"reference generation {i}/{n}"),
    )
    return compare(prompts, reference, served, tokenizer, log_probs_requested=log_probs)
