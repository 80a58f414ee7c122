"""Speculative decoding: draft a few tokens cheaply, verify them all in one target step.

Prompt lookup (n-gram drafting) needs no second model: the tokens that followed the last
occurrence of the sequence's final n-gram (in its prompt or its output so far) are the draft.
Input-grounded tasks (rewriting, summarising, code editing, retrieval-augmented answers) repeat
long runs of their input, which is where the guess is right.

A verify step gives each drafted sequence one row per token (its last token, then the draft):
every row is an ordinary decode row at its own position, reading the sequence's own blocks, so
the decode path and its CUDA graphs serve it unchanged. Greedy rows accept the draft up to the
first token the target would not have chosen, then add the target's own token: the output is
the one plain greedy decoding gives, one or more tokens per step.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SpeculativeStats:
    steps: int = 0  # verify steps that carried at least one draft
    drafted: int = 0  # draft tokens sent to the target
    accepted: int = 0  # of those, tokens the target agreed with

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a drafted sequence gained per verify step (1 is plain decoding)."""
        return 1.0 + self.accepted / self.steps if self.steps else 1.0


class PromptLookup:
    """Draft the continuation of the latest earlier occurrence of the longest matching suffix."""

    def __init__(self, num_tokens: int, max_ngram: int = 3, min_ngram: int = 1):
        if num_tokens < 1:
            raise ValueError(f"max_draft_len must be >= 1, got {num_tokens}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}, {max_ngram}")
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to min(num_tokens, limit) draft tokens; [] when no suffix recurs."""
        k = min(self.num_tokens, limit)
        if k < 1:
            return []
        n_tokens = len(tokens)
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            suffix = tokens[-n:]
            first = suffix[0]
            # latest occurrence first: recent context predicts the next tokens best
            for start in range(n_tokens - n - 1, -1, -1):
                if tokens[start] == first and tokens[start:start + n] == suffix:
                    follow = tokens[start + n:start + n + k]
                    if follow:
                        return follow
        return []


def accept(draft: list[int], target: list[int]) -> list[int]:
    """The tokens a verify step adds: the agreed draft prefix, then the target's own next token.

    target[i] is the target's greedy choice after the last token and draft[:i] (len(draft) + 1 values).
    """
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return target[: n + 1]
