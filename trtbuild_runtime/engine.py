"""The step loop: requests in, one scheduled step at a time, per-request outputs out.

`LLMEngine` is synchronous (`add_request`, `step`, `generate`); `EngineLoop` runs it on a thread
for a server: requests and cancellations are queued from any thread and results come back through
`get_results` (everything produced since the last call, one list per step merged), next to the
names of transformers' continuous-batching manager (`add_request`, `cancel_request`) so the Triton
model drives either one. A request is validated before it joins the batch, so a bad one is refused on its
own; a step that fails fails only the requests it ran and the loop keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import traceback

from trtbuild_runtime.block_manager import BlockManager
from trtbuild_runtime.config import EngineConfig, check_supported
from trtbuild_runtime.model_runner import ModelRunner
from trtbuild_runtime.scheduler import Scheduler
from trtbuild_runtime.sequence import FinishReason, SamplingParams, Sequence
from trtbuild_runtime.speculative import PromptLookup, SpeculativeStats, accept

log = logging.getLogger("trtbuild_runtime")


@dataclasses.dataclass(slots=True)
class RequestOutput:
    request_id: str
    generated_tokens: list[int]  # every token generated so far
    logprobs: list[float]
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_len: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache

    def is_finished(self) -> bool:
        return self.finish_reason is not None


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.hf_config = check_supported(config.model, config.max_seq_len)
        self.runner = ModelRunner(config, self.hf_config)
        self.vocab_size = self.runner.vocab_size
        self.blocks = BlockManager(self.runner.num_blocks, config.kv_cache_page_size, config.enable_kv_cache_reuse)
        proposer = PromptLookup(config.max_draft_len, config.max_matching_ngram_size) if config.speculative_decoding_mode == "ngram" else None
        self.scheduler = Scheduler(config, self.blocks, proposer, self.runner.graph_sizes[-1] if self.runner.graphs else None)
        self.speculation = SpeculativeStats()
        self.seqs: dict[str, Sequence] = {}
        self.steps = 0
        self.failed_steps = 0

    # ------------------------------------------------------------------ requests
    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError (with what to change) for a request that must not join the batch."""
        params.validate(self.vocab_size)
        if not prompt:
            raise ValueError("the prompt is empty")
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) + params.max_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds max_seq_len "
                             f"{self.config.max_seq_len}")

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already running")
        self.check_request(prompt, params)
        seq = Sequence(request_id, prompt, params, arrival=time.monotonic())
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, FinishReason.ABORT)
        return self._output(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ steps
    def step(self) -> list[RequestOutput]:
        """Run one step; an output for every sequence that got a token or finished."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        self.steps += 1
        sampling = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        try:
            tokens, logprobs = self.runner.run(batch)
        except Exception as e:  # noqa: BLE001 - the step's requests fail, the engine keeps serving
            self.failed_steps += 1
            log.error("a step of %d sequences failed: %s", len(batch.seqs), traceback.format_exc())
            outputs = []
            for seq in batch.seqs:
                seq.error = f"{type(e).__name__}: {e}"
                outputs.append(self._finish(seq, FinishReason.ERROR))
            return outputs
        outputs = []
        if not batch.drafts:  # one token per sequence: the loop every decode step at full load runs, kept short
            output, finish = self._output, self._finish
            for row, seq in enumerate(sampling):
                seq.append(tokens[row], logprobs[row] if logprobs is not None and seq.params.logprobs else None)
                reason = seq.check_finished()
                outputs.append(finish(seq, reason) if reason else output(seq))
            self.scheduler.finish_step(batch)
            return outputs
        row = 0
        for i, seq in enumerate(sampling):
            draft = batch.drafts[i] if batch.drafts else ()
            new = accept(draft, tokens[row:row + len(draft) + 1]) if draft else (tokens[row],)
            logprob = logprobs[row] if logprobs is not None and seq.params.logprobs else None
            row += len(draft) + 1
            if draft:
                self.speculation.steps += 1
                self.speculation.drafted += len(draft)
                self.speculation.accepted += len(new) - 1
            reason = None
            for token in new:
                seq.append(token, logprob)
                reason = seq.check_finished()
                if reason:
                    break
            outputs.append(self._finish(seq, reason) if reason else self._output(seq))
        self.scheduler.finish_step(batch)
        return outputs

    def _finish(self, seq: Sequence, reason: FinishReason) -> RequestOutput:
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.request_id, None)
        return self._output(seq)

    @staticmethod
    def _output(seq: Sequence) -> RequestOutput:
        return RequestOutput(seq.request_id, seq.generated, list(seq.logprobs), seq.finish_reason, seq.error,
                             seq.prompt_len, seq.num_cached)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Offline: every prompt to completion, outputs in prompt order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params):
            self.add_request(request_id, prompt, p)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.is_finished():
                    done[out.request_id] = out
        return [done[i] for i in ids]

    @property
    def stats(self) -> dict:
        return {"steps": self.steps, "failed_steps": self.failed_steps, "preemptions": self.scheduler.preemptions,
                "prefix_cache_hit_rate": self.blocks.hit_rate, "free_blocks": self.blocks.num_free,
                "num_blocks": self.blocks.num_blocks, "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting), "speculative_acceptance_rate": self.speculation.acceptance_rate,
                "speculative_tokens_per_step": self.speculation.tokens_per_step}


class EngineLoop:
    """An LLMEngine on a background thread; thread-safe submit, cancel and result queue."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="trtbuild-engine", daemon=True)

    def start(self) -> "EngineLoop":
        self.thread.start()
        return self

    def is_running(self) -> bool:
        return self.thread.is_alive()

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        """Validated here, on the caller's thread: a bad request raises ValueError and never reaches the batch."""
        self.engine.check_request(prompt, params)
        self.inbox.put(("add", request_id, prompt, params))
        self.wake.set()

    def cancel_request(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))
        self.wake.set()

    def get_results(self, timeout: float | None = None) -> list[RequestOutput]:
        """Every output waiting (blocking up to `timeout` for the first), oldest first."""
        try:
            outputs = list(self.results.get(timeout=timeout))
        except queue.Empty:
            return []
        while True:
            try:
                outputs.extend(self.results.get_nowait())
            except queue.Empty:
                return outputs

    def stop(self, block: bool = True, timeout: float | None = None) -> None:
        self.stopping.set()
        self.wake.set()
        if block and self.thread.is_alive():
            self.thread.join(timeout)

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "stall":  # fault injection (EngineLoop.stall): block as a wedged step would
                self.stopping.wait()
                return
            if item[0] == "add":
                _, request_id, prompt, params = item
                try:
                    self.engine.add_request(request_id, prompt, params)
                except ValueError as e:
                    self.results.put([RequestOutput(request_id, [], [], FinishReason.ERROR, str(e), len(prompt))])
            else:
                out = self.engine.abort(item[1])
                if out is not None:
                    self.results.put([out])

    def _run(self) -> None:
        while not self.stopping.is_set():
            self._drain_inbox()
            if not self.engine.has_work():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            outputs = self.engine.step()
            if outputs:
                self.results.put(outputs)
            if self.engine.config.fault_injection_step_delay_ms:
                time.sleep(self.engine.config.fault_injection_step_delay_ms / 1e3)
