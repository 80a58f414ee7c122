"""Which sequences run in the next step: continuous batching with chunked prefill and preemption.

A step is either a prefill step (prompt tokens of waiting sequences, up to the token budget,
a prompt longer than what is left of the budget is cut into chunks) or a decode step (one token
for every running sequence). Prefill goes first whenever a waiting sequence can be admitted, so
new requests wait at most one step for their first token. When a running sequence needs a block
and none is free, the most recently admitted sequence is preempted: its blocks are released and
it goes back to the front of the queue, to be recomputed from its tokens (prompt and output so far).

With speculative decoding on, a decode step also carries drafts (`speculative`): only while the
rows they add fit the largest captured batch, so speculation yields to throughput under load.
"""

from __future__ import annotations

import collections
import dataclasses

from trtbuild_runtime.block_manager import BlockManager
from trtbuild_runtime.config import EngineConfig
from trtbuild_runtime.sequence import FinishReason, Sequence, Status
from trtbuild_runtime.speculative import PromptLookup


@dataclasses.dataclass
class Batch:
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens each sequence computes in this step, from its num_computed
    is_prefill: bool
    drafts: list[list[int]] | None = None  # decode: tokens each sequence verifies after its last one

    @property
    def num_rows(self) -> int:
        """Rows the model computes: one per sequence, plus one per draft token."""
        return len(self.seqs) + (sum(map(len, self.drafts)) if self.drafts else 0)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token in this step, and so gets a new one."""
        return self.seqs[i].num_computed + self.num_tokens[i] == len(self.seqs[i])


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, proposer: PromptLookup | None = None,
                 max_rows: int | None = None):
        self.max_batch_size = config.max_batch_size
        self.max_rows = max_rows or config.max_batch_size  # rows one decode step may compute (drafts included)
        self.budget = config.max_num_tokens
        self.blocks = blocks
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.proposer = proposer

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        return self._prefill() or self._decode()

    def _prefill(self) -> Batch | None:
        seqs, counts, budget = [], [], self.budget
        admitted = sum(1 for s in self.waiting if s.block_table)
        for seq in list(self.waiting):
            if budget == 0:
                break
            if not seq.block_table and seq.num_computed == 0:
                if len(self.running) + admitted >= self.max_batch_size:
                    break
                if not self.blocks.can_allocate(seq, min(len(seq), seq.num_computed + budget)):
                    break
                self.blocks.allocate(seq)
                admitted += 1
            chunk = min(len(seq) - seq.num_computed, budget)
            if not self.blocks.can_ensure(seq, seq.num_computed + chunk):
                break
            self.blocks.ensure(seq, seq.num_computed + chunk)
            seqs.append(seq)
            counts.append(chunk)
            budget -= chunk
        return Batch(seqs, counts, is_prefill=True) if seqs else None

    def _decode(self) -> Batch | None:
        scheduled = []
        running = self.running
        while running:
            seq = running.pop(0)
            while not self.blocks.can_ensure(seq, len(seq)):
                if running:
                    self._preempt(running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.blocks.ensure(seq, len(seq))
                scheduled.append(seq)
        self.running = scheduled
        if not scheduled:
            return None
        return Batch(scheduled, [1] * len(scheduled), is_prefill=False, drafts=self._drafts(scheduled) if self.proposer else None)

    def _drafts(self, seqs: list[Sequence]) -> list[list[int]] | None:
        """A draft for each greedy sequence, while the rows fit the largest decode batch."""
        rows_left = self.max_rows - len(seqs)
        drafts, any_draft = [], False
        for seq in seqs:
            draft: list[int] = []
            p = seq.params
            if rows_left > 0 and p.greedy and not p.logprobs and seq.num_generated >= p.min_tokens:
                limit = min(rows_left, p.max_tokens - seq.num_generated - 1)
                draft = self.proposer.propose(seq.tokens, limit)
                if draft and self.blocks.can_ensure(seq, len(seq) + len(draft)):
                    self.blocks.ensure(seq, len(seq) + len(draft))
                    rows_left -= len(draft)
                    any_draft = True
                else:
                    draft = []
            drafts.append(draft)
        return drafts if any_draft else None

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish_step(self, batch: Batch) -> None:
        """Advance what was computed, once the step's tokens are appended; prompts that completed
        join the running batch. A decode step leaves every token but the newest with KV (a rejected
        draft's KV is overwritten later: it lies past the sequence's length)."""
        page = self.blocks.page_size
        for i, seq in enumerate(batch.seqs):
            if seq.is_finished:
                continue
            before = seq.num_computed
            seq.num_computed = before + batch.num_tokens[i] if batch.is_prefill else len(seq) - 1
            if batch.is_prefill and not seq.in_prefill:
                self.waiting.remove(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
            if batch.is_prefill or seq.num_computed // page > before // page:
                self.blocks.publish(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.blocks.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def drop_finished(self) -> None:
        self.running = [s for s in self.running if not s.is_finished]
