"""Next tokens for a whole batch on the device: greedy, temperature, top-k, top-p, seeds, min_tokens.

Sampling draws with the exponential race (argmax of p / E, E ~ Exp(1)), which equals drawing
from p; each seeded request draws its E from its own generator, so its output does not depend on
its neighbours. Log-probabilities are those of the model's own distribution (log-softmax of the
raw logits), which is what an accuracy comparison against the reference model needs.
"""

from __future__ import annotations

import dataclasses

import torch

from trtbuild_runtime.sequence import Sequence


@dataclasses.dataclass
class SamplingTensors:
    temperature: torch.Tensor | None  # [B] float32, 1.0 for greedy rows; None when every row is greedy
    top_k: torch.Tensor | None  # [B] int64, vocab for "off"
    top_p: torch.Tensor | None  # [B] float32
    greedy: bool  # every row is greedy
    needs_top_k: bool
    needs_top_p: bool
    seeded: list[int]  # rows with their own generator
    masks: list[tuple[int, int]]  # (row, token) pairs set to -inf (end tokens before min_tokens)
    logprobs: bool

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int, device: torch.device) -> "SamplingTensors":
        """Host-side work is kept to a minimum for the common all-greedy batch: no tensors at all."""
        masks = [(row, t) for row, seq in enumerate(seqs) if seq.num_generated < seq.params.min_tokens for t in seq.params.end_ids]
        logprobs = any(s.params.logprobs for s in seqs)
        if all(s.params.greedy for s in seqs):
            return cls(None, None, None, True, False, False, [], masks, logprobs)
        temps, ks, ps, seeded = [], [], [], []
        for row, seq in enumerate(seqs):
            p = seq.params
            greedy = p.greedy
            temps.append(1.0 if greedy else p.temperature)
            ks.append(vocab_size if greedy or p.top_k == 0 else p.top_k)
            ps.append(1.0 if greedy else p.top_p)
            if p.seed is not None and not greedy:
                seeded.append(row)
        return cls(
            torch.tensor(temps, dtype=torch.float32).to(device),
            torch.tensor(ks, dtype=torch.int64).to(device),
            torch.tensor(ps, dtype=torch.float32).to(device),
            False, any(k < vocab_size for k in ks), any(p < 1.0 for p in ps), seeded, masks, logprobs,
        )


def sample(logits: torch.Tensor, t: SamplingTensors, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids [B] and, if any row asked, the log-probabilities of those tokens [B].

    An all-greedy batch without log-probs masks and takes the argmax in the model's own dtype (the
    logits are this step's own buffer): bf16 to float32 is exact, so the tokens are the same and the
    float copy of [B, vocab] is saved.
    """
    if t.masks:
        rows, tokens = zip(*t.masks)
        logits[list(rows), list(tokens)] = float("-inf")
    if t.greedy and not t.logprobs:
        return logits.argmax(dim=-1), None
    logits = logits.float()
    if t.greedy:
        tokens = logits.argmax(dim=-1)
    else:
        tokens = _sample(logits, t, seqs)
    logprobs = None
    if t.logprobs:
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


def _sample(logits: torch.Tensor, t: SamplingTensors, seqs: list[Sequence]) -> torch.Tensor:
    greedy_rows = torch.tensor([s.params.greedy for s in seqs]).to(logits.device)
    scaled = logits / t.temperature[:, None]
    if t.needs_top_k or t.needs_top_p:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        keep = torch.ones_like(sorted_logits, dtype=torch.bool)
        if t.needs_top_k:
            ranks = torch.arange(sorted_logits.shape[-1], device=logits.device)
            keep &= ranks[None, :] < t.top_k[:, None]
        if t.needs_top_p:
            probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of the better tokens: keep while it is below top_p
            keep &= before < t.top_p[:, None]
        keep[:, 0] = True
        sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
    probs = torch.softmax(scaled, dim=-1)
    race = torch.empty_like(probs).exponential_()
    for row in t.seeded:
        seq = seqs[row]
        if seq.generator is None:
            seq.generator = torch.Generator(device=logits.device)
            seq.generator.manual_seed(seq.params.seed)
        race[row].exponential_(generator=seq.generator)
    sampled = (probs / race).argmax(dim=-1)
    return torch.where(greedy_rows, logits.argmax(dim=-1), sampled)
