"""Benchmark prompts: synthetic ones of a chosen token length, or a JSONL file.

Synthetic prompts are random words taken from the model's own vocabulary (tokens that are a whole
word with a leading space), so that their token count under that tokenizer is exact and every
prompt differs from the others (no accidental prefix-cache hits). Lengths follow a normal
distribution (mean, stddev) rounded and clipped to at least one token.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from trtbuild.errors import TrtbuildError

TEXT_KEYS = ("text", "prompt", "text_input")
OUTPUT_KEYS = ("output_tokens", "max_tokens")


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    input_tokens: int | None  # under the benchmark tokenizer, without special tokens
    output_tokens: int  # max_tokens sent with the request


@dataclasses.dataclass(frozen=True)
class LengthDistribution:
    mean: float
    stddev: float = 0.0

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.mean < 1:
            raise TrtbuildError(f"a token length mean must be at least 1, got {self.mean:g}")
        if self.stddev < 0:
            raise TrtbuildError(f"a token length stddev must be >= 0, got {self.stddev:g}")
        values = rng.normal(self.mean, self.stddev, n) if self.stddev > 0 else np.full(n, self.mean)
        return np.maximum(1, np.rint(values)).astype(int)


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise TrtbuildError(f"--tokenizer {path}: cannot load a tokenizer ({str(e).splitlines()[0]})",
                            hint="point it at the checkpoint or tokenizer folder the model was built from") from None


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def word_pool(tokenizer) -> np.ndarray:
    """Ids of vocabulary tokens that are one ASCII word preceded by a space."""
    pool = []
    for token, idx in tokenizer.get_vocab().items():
        if token[:1] in ("Ġ", "▁") and len(token) >= 3:
            word = token[1:]
            if word.isascii() and word.isalpha():
                pool.append(idx)
    if len(pool) < 100:
        raise TrtbuildError("the tokenizer has too few whole-word tokens for synthetic prompts",
                            hint="pass --prompts FILE.jsonl instead")
    return np.array(sorted(pool))


def synthetic_text(tokenizer, pool: np.ndarray, length: int, rng: np.random.Generator) -> tuple[str, int]:
    """Random words whose encoding is `length` tokens (or as close as the tokenizer allows)."""
    ids = list(rng.choice(pool, size=length))
    best: tuple[str, int] | None = None
    for _ in range(8):
        text = tokenizer.decode(ids).strip()
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if best is None or abs(n - length) < abs(best[1] - length):
            best = (text, n)
        if n == length:
            break
        if n > length:
            ids = ids[: max(1, len(ids) - (n - length))]
        else:
            ids += list(rng.choice(pool, size=length - n))
    return best


def synthetic_prompts(tokenizer, n: int, input_len: LengthDistribution, output_len: LengthDistribution,
                      seed: int = 0) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    pool = word_pool(tokenizer)
    inputs, outputs = input_len.sample(rng, n), output_len.sample(rng, n)
    prompts = []
    for length, out in zip(inputs, outputs):
        text, count = synthetic_text(tokenizer, pool, int(length), rng)
        prompts.append(Prompt(text, count, int(out)))
    return prompts


def load_jsonl(path: Path, tokenizer, output_len: LengthDistribution, seed: int = 0) -> list[Prompt]:
    """One JSON object per line with the prompt under `text` (or `prompt`, `text_input`) and,
    optionally, its output length under `output_tokens` (or `max_tokens`)."""
    path = Path(path)
    if not path.is_file():
        raise TrtbuildError(f"--prompts {path} does not exist")
    rows: list[tuple[str, int | None]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrtbuildError(f"{path}:{number}: not JSON ({e.msg})") from None
        text = next((obj[k] for k in TEXT_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), str)), None)
        if text is None:
            raise TrtbuildError(f"{path}:{number}: no prompt string", hint=f"give it under one of {', '.join(TEXT_KEYS)}")
        out = next((obj[k] for k in OUTPUT_KEYS if obj.get(k) is not None), None)
        if out is not None and (not isinstance(out, int) or out < 1):
            raise TrtbuildError(f"{path}:{number}: output length must be a positive integer, got {out!r}")
        rows.append((text, out))
    if not rows:
        raise TrtbuildError(f"--prompts {path} holds no prompts")
    sampled = output_len.sample(np.random.default_rng(seed), len(rows))
    counts = count_tokens(tokenizer, [t for t, _ in rows]) if tokenizer is not None else [None] * len(rows)
    return [Prompt(t, c, o if o is not None else int(s)) for (t, o), c, s in zip(rows, counts, sampled)]
