"""One request: its tokens, its sampling parameters and where its KV cache lives."""

from __future__ import annotations

import dataclasses
import enum
import itertools


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """TensorRT-LLM's request semantics: greedy is top_k 1 or temperature 0."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0  # end tokens are masked until this many are generated
    end_ids: tuple[int, ...] = ()  # generation stops after any of these (kept as the last token, as HF generate does)
    ignore_eos: bool = False
    logprobs: bool = False  # log-probabilities of the chosen tokens under the model's distribution

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.top_k > vocab_size:
            raise ValueError(f"top_k {self.top_k} exceeds the vocabulary ({vocab_size} tokens)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")
        for end in self.end_ids:
            if not 0 <= end < vocab_size:
                raise ValueError(f"end_id {end} is outside the vocabulary [0, {vocab_size})")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end token
    LENGTH = "length"  # max_tokens
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the step that ran it failed


_ids = itertools.count()


class Sequence:
    """Prompt + generated tokens; `num_computed` of them have KV in `block_table`."""

    __slots__ = ("request_id", "seq_id", "prompt_len", "tokens", "params", "status", "block_table", "num_computed",
                 "num_cached", "finish_reason", "logprobs", "arrival", "generator", "error")

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, arrival: float = 0.0):
        self.request_id = request_id
        self.seq_id = next(_ids)
        self.prompt_len = len(prompt)
        self.tokens = list(prompt)
        self.params = params
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0  # tokens whose KV is in the cache
        self.num_cached = 0  # of those, taken from the prefix cache
        self.finish_reason: FinishReason | None = None
        self.logprobs: list[float] = []
        self.arrival = arrival
        self.generator = None  # a seeded torch.Generator, created by the runner on first use
        self.error: str | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def in_prefill(self) -> bool:
        """Tokens besides the last one still lack KV: the next step runs (part of) the prompt."""
        return self.num_computed < len(self.tokens) - 1

    def append(self, token: int, logprob: float | None) -> None:
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)

    def check_finished(self) -> FinishReason | None:
        p = self.params
        last = self.tokens[-1]
        if not p.ignore_eos and last in p.end_ids and self.num_generated > p.min_tokens:
            return FinishReason.STOP
        if self.num_generated >= p.max_tokens:
            return FinishReason.LENGTH
        return None
