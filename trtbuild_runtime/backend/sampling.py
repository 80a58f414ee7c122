"""What a request's sampling inputs mean, by TensorRT-LLM's conventions, for either engine."""


def check_sampling(vocab_size: int, temperature=None, top_k=None, top_p=None, seed=None) -> None:
    """Refuse sampling values no engine can honour, whether or not the request is greedy."""
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"runtime_top_k must be >= 0 (0: off), got {top_k}")
    if top_k is not None and top_k > vocab_size:
        raise ValueError(f"runtime_top_k {top_k} exceeds the vocabulary ({vocab_size} tokens)")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"runtime_top_p must be in [0, 1], got {top_p}")
    if seed is not None and not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")


def is_greedy(temperature=None, top_k=None, top_p=None) -> bool:
    """TensorRT-LLM's convention: temperature 0, top_k 1, or neither top_k nor top_p set."""
    return temperature == 0.0 or top_k == 1 or (not top_k and not top_p)


def engine_sampling(temperature=None, top_k=None, top_p=None, seed=None) -> dict:
    """SamplingParams fields for trtbuild_runtime."""
    if is_greedy(temperature, top_k, top_p):
        return {"top_k": 1}
    return {"temperature": 1.0 if temperature is None else float(temperature), "top_k": int(top_k or 0),
            "top_p": float(top_p) if top_p else 1.0, "seed": None if seed is None else int(seed)}


def sampling_kwargs(per_request: bool, vocab_size: int, temperature=None, top_k=None, top_p=None) -> dict:
    """Per-request sampling values for `add_request`; TensorRT-LLM's convention for greedy."""
    if is_greedy(temperature, top_k, top_p):
        return {"top_k": 1, "top_p": 1.0, "temperature": 1.0} if per_request else {}
    if not per_request:
        raise ValueError("this transformers version has no per-request sampling in continuous batching; send greedy requests")
    return {
        "top_k": int(top_k) if top_k else vocab_size,
        "top_p": float(top_p) if top_p else 1.0,
        "temperature": float(temperature) if temperature is not None else 1.0,
    }
