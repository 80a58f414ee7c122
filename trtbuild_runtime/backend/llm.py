"""The LLM step, and the text model every served path ends in: tokenizer, engine and incremental
detokenizer in one Python model, so a response costs one Python hop.

It answers text (`text_input` in, `text_output` out, with the ensemble's input names: NVIDIA's
`ensemble` and `tensorrt_llm_bls` are single-step ensembles onto it, routed by Triton's core, and
Triton's OpenAI-compatible frontend calls it directly) and NVIDIA's `tensorrt_llm` tensors
(input_ids, input_lengths, request_output_len, ... -> output_ids, sequence_length, log-probs).
The engine (trtbuild_runtime or transformers' continuous batching, `engines`) runs its own step
loop; one dispatcher thread turns its results into responses, so a slow or vanished client never
holds a step back:

- streamed tokens coalesce: when the engine produces them faster than responses go out, one
  response carries every token since the last (bounded by `stream_interval_ms` and
  `stream_max_tokens`); the concatenated text never changes;
- a request whose client cancelled or disconnected is aborted (its KV blocks freed) within
  CANCEL_CHECK_S, and gets its final response;
- a failed send ends that request alone;
- health: if the engine loop dies, or makes no progress for `engine_stall_timeout_s` while requests
  are in flight, every request in flight gets an error, new ones fail at once naming the cause, and
  the gauge `trtbuild_engine_healthy` drops to 0 (`trtbuild serve` exits on it; the generated
  probes send a one-token generate, which fails). The process is not repaired in place: a wedged
  engine may hold the GPU in an unknown state, so the deployment restarts it.
"""

import threading
import time
import traceback
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild_runtime.backend.engines import Generation, open_engine
from trtbuild_runtime.backend.sampling import check_sampling
from trtbuild_runtime.backend.tensors import (MISSING_OUTPUT_LEN, error_response, optional, parameters, scalar, stop_index,
                                              strings, tensor, words_list)
from trtbuild_runtime.backend.tokenizer import IncrementalDecoder, load_tokenizer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_S = 0.01  # each check asks Triton about every request in flight: not every step
GAUGE_UPDATE_S = 0.1

# Inputs this runtime cannot honour, with the value(s) that mean "off" and what to do instead.
UNSUPPORTED = {
    "beam_width": ((1,), "beam search is not supported by {engine}; send beam_width 1"),
    "num_return_sequences": ((1,), "send one request per sequence (num_return_sequences 1)"),
    "len_penalty": ((1.0,), "length_penalty only applies to beam search, which {engine} does not run"),
    "repetition_penalty": ((1.0,), "repetition_penalty is not supported by {engine}"),
    "presence_penalty": ((0.0,), "presence_penalty is not supported by {engine}"),
    "frequency_penalty": ((0.0,), "frequency_penalty is not supported by {engine}"),
    "return_context_logits": ((False,), "context logits are not returned by {engine}"),
    "return_generation_logits": ((False,), "generation logits are not returned by {engine}"),
    "stop": ((False,), "cancel a request by closing its stream instead of sending stop"),
}
ENGINE_NAMES = {"trtbuild": "trtbuild_runtime", "transformers": "transformers continuous batching"}

# the engine's own counters, next to Triton's metrics on :8002/metrics
ENGINE_GAUGES = {
    "prefix_cache_hit_rate": ("trtbuild_prefix_cache_hit_ratio", "Prompt tokens served from the prefix cache, of those looked up"),
    "speculative_acceptance_rate": ("trtbuild_speculative_acceptance_ratio", "Draft tokens the target model accepted"),
    "speculative_tokens_per_step": ("trtbuild_speculative_tokens_per_step", "Tokens a drafted sequence gains per verify step"),
    "free_blocks": ("trtbuild_kv_cache_free_blocks", "KV-cache blocks not held by a running sequence"),
    "preemptions": ("trtbuild_preemptions", "Sequences preempted for lack of KV blocks, since start"),
}
HEALTH_GAUGE = ("trtbuild_engine_healthy", "1 while the engine loop runs and makes progress; 0 once this server must be restarted")


class _State:
    """One request in flight."""

    __slots__ = ("sender", "request", "prompt", "streaming", "exclude_input", "return_log_probs", "stop_words",
                 "holdback", "sent", "checked", "cum_log_prob", "done", "text", "last_sent", "counts", "perf",
                 "arrival_ns", "first_token_ns")

    def __init__(self, sender, request, prompt, streaming, exclude_input, return_log_probs, stop_words, text, counts, perf,
                 arrival_ns):
        self.sender = sender
        self.request = request
        self.prompt = prompt
        self.streaming = streaming
        self.exclude_input = exclude_input
        self.return_log_probs = return_log_probs
        self.stop_words = stop_words
        self.holdback = max((len(w) for w in stop_words), default=1) - 1
        self.sent = 0
        self.checked = 0  # tokens already searched for stop words
        self.cum_log_prob = 0.0
        self.done = False
        self.text = text  # an IncrementalDecoder when the request came as text_input
        self.last_sent = 0.0
        self.counts = counts  # (num_input_tokens, num_output_tokens) asked for (OpenAI frontend's usage)
        self.perf = perf  # return_perf_metrics
        self.arrival_ns = arrival_ns
        self.first_token_ns = 0


class TritonPythonModel:
    def initialize(self, args):
        config, p = parameters(args)
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the LLM step must be decoupled")
        self.max_batch_size = max(1, int(config.get("max_batch_size", 1)))
        self.max_input_len = int(p["max_input_len"])
        self.max_output_len = int(p["max_output_len"])
        self.max_seq_len = self.max_input_len + self.max_output_len
        self.exclude_input_default = p["exclude_input_in_output"].lower() == "true"
        self.add_special_tokens = p.get("add_special_tokens", "true").lower() == "true"
        self.skip_special_tokens = p.get("skip_special_tokens", "true").lower() == "true"
        self.stream_interval = float(p.get("stream_interval_ms", "0")) / 1e3
        self.stream_max_tokens = int(p.get("stream_max_tokens", "0"))
        self.stall_timeout = float(p.get("engine_stall_timeout_s", "60"))
        self.stall_marker = p.get("fault_injection_stall_prompt", "")  # a prompt holding it wedges the engine (tests)
        self.tokenizer = load_tokenizer(p["tokenizer_dir"])
        self.default_end_id = self.tokenizer.eos_token_id
        self.engine = open_engine(p, self.max_batch_size, self.max_seq_len, self.tokenizer)
        self.engine_name = ENGINE_NAMES[self.engine.name]
        self.vocab_size = self.engine.vocab_size
        pb_utils.Logger.log_info(f"LLM engine: {self.engine.describe()} ({p.get('engine_reason', '')})")
        # outputs that never change, built once: a response costs a few tensors, not eight
        self.constant_outputs = (
            tensor("context_logits", np.zeros((1, 1, 1), np.float32)),
            tensor("generation_logits", np.zeros((1, 1, 1, 1), np.float32)),
            tensor("batch_index", np.zeros((1, 1), np.int32)),
            tensor("sequence_index", np.zeros((1, 1), np.int32)),
        )
        self.lock = threading.Lock()
        self.active = {}
        self.unhealthy = None  # why this server must be restarted, once it must
        self.last_progress = self.last_cancel_check = self.last_gauge_update = time.monotonic()
        self.gauges = self._gauges(args["model_name"])
        self.stopping = threading.Event()
        self.dispatcher = threading.Thread(target=self._dispatch, name="trtbuild-dispatch", daemon=True)
        self.dispatcher.start()

    def _gauges(self, model_name):
        """A Metric dies with its MetricFamily: both are kept, the families on the model."""
        self.metric_families, gauges = [], {}
        stats = self.engine.stats
        for key, (name, description) in {"healthy": HEALTH_GAUGE, **ENGINE_GAUGES}.items():
            if key != "healthy" and key not in stats:
                continue
            family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.GAUGE)
            self.metric_families.append(family)
            gauges[key] = family.Metric(labels={"model": model_name})
        gauges["healthy"].set(1.0)
        return gauges

    # ---------------------------------------------------------------- requests in
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            if self.unhealthy:
                sender.send(error_response(f"the LLM engine is not healthy ({self.unhealthy}); this server must be "
                                           "restarted", pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
                continue
            try:
                self._submit(request, sender)
            except ValueError as e:
                sender.send(error_response(str(e)), flags=FINAL)
        return None

    def _prompt(self, request):
        """Token ids from input_ids/input_lengths (NVIDIA's tensors) or text_input (the text model)."""
        text = optional(request, "text_input")
        if text is not None:
            queries = strings(text)
            if len(queries) != 1:
                raise ValueError(f"text_input must hold one prompt, got {len(queries)}")
            ids = self.tokenizer.encode(queries[0], add_special_tokens=self.add_special_tokens)
            if len(ids) > self.max_input_len:
                raise ValueError(f"prompt has {len(ids)} tokens, more than max_input_len={self.max_input_len} this build allows")
            return np.array([ids], np.int64), np.array([len(ids)]), queries[0]
        ids = optional(request, "input_ids")
        if ids is None:
            raise ValueError("text_input is required (or input_ids with input_lengths, NVIDIA's tensor interface)")
        lengths = optional(request, "input_lengths")
        if lengths is None:
            raise ValueError("input_lengths is required with input_ids")
        return ids, lengths.reshape(-1), None

    def _first(self, request, *names):
        """The value of the first of `names` the request carries (the LLM's name, then the ensemble's)."""
        return next((v for v in (scalar(request, n) for n in names) if v is not None), None)

    def _stop_words(self, request):
        words = optional(request, "stop_words")
        if words is None:
            return words_list(optional(request, "stop_words_list"))
        out = []
        for word in (w for w in strings(words) if w):
            for variant in ((word,) if word[:1].isspace() else (word, " " + word)):
                out.append(self.tokenizer.encode(variant, add_special_tokens=False))
        return out

    def _submit(self, request, sender):
        arrival_ns = time.time_ns()
        ids, lengths, text = self._prompt(request)
        if ids.shape[0] != 1:
            raise ValueError(f"send one prompt per request (got a batch of {ids.shape[0]}); batching happens in flight")
        for name, (neutral, why) in UNSUPPORTED.items():
            value = scalar(request, name)
            if value is not None and value not in neutral:
                raise ValueError(f"{name}={value} cannot be honoured: {why.format(engine=self.engine_name)}")
        prompt = ids[0, : int(lengths[0])].astype(np.int64).tolist()
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {self.vocab_size})")
        if not prompt:
            raise ValueError("the prompt is empty (input_lengths 0)")
        max_tokens = scalar(request, "max_tokens")
        if max_tokens is None:  # NVIDIA's tensor; the preprocessing model marks a missing max_tokens with a sentinel
            max_tokens = scalar(request, "request_output_len")
            if max_tokens is not None and int(max_tokens) == MISSING_OUTPUT_LEN:
                max_tokens = None
        if max_tokens is None:
            raise ValueError("max_tokens is required (request_output_len in NVIDIA's tensor interface)")
        max_tokens = int(max_tokens)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if max_tokens > self.max_output_len or len(prompt) + max_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds this build's limits "
                f"(max_input_len {self.max_input_len}, max_output_len {self.max_output_len})"
            )
        if words_list(optional(request, "bad_words_list")) or any(strings(optional(request, "bad_words", np.array([], object)))):
            raise ValueError(f"bad_words cannot be honoured by {self.engine_name}")
        end_id = int(scalar(request, "end_id", self.default_end_id))
        if not 0 <= end_id < self.vocab_size:
            raise ValueError(f"end_id {end_id} is outside the vocabulary [0, {self.vocab_size})")
        min_tokens = int(scalar(request, "min_tokens", 0))
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        sampling = {"temperature": scalar(request, "temperature"), "top_k": self._first(request, "runtime_top_k", "top_k"),
                    "top_p": self._first(request, "runtime_top_p", "top_p"), "seed": scalar(request, "seed")}
        check_sampling(self.vocab_size, **sampling)
        state = _State(
            sender, request, prompt,
            streaming=bool(self._first(request, "streaming", "stream")),
            exclude_input=bool(scalar(request, "exclude_input_in_output", self.exclude_input_default)),
            return_log_probs=bool(scalar(request, "return_log_probs", False)),
            stop_words=self._stop_words(request),
            text=IncrementalDecoder(self.tokenizer, self.skip_special_tokens) if text is not None else None,
            counts=(bool(scalar(request, "return_num_input_tokens", False)), bool(scalar(request, "return_num_output_tokens", False))),
            perf=bool(scalar(request, "return_perf_metrics", False)),
            arrival_ns=arrival_ns,
        )
        request_id = uuid.uuid4().hex
        with self.lock:
            if not self.active:
                self.last_progress = time.monotonic()  # the stall clock runs only while work is in flight
            self.active[request_id] = state
        try:
            self.engine.add(request_id, prompt, Generation(max_tokens, min_tokens, end_id, state.return_log_probs, sampling))
        except ValueError:
            self._finish(request_id, state)
            raise
        if self.stall_marker and text is not None and self.stall_marker in text:
            self.engine.stall()

    # ---------------------------------------------------------------- results out
    def _dispatch(self):
        """Never dies quietly: an error here is logged and the loop goes on; should it end anyway, the
        model reports itself unhealthy, since nothing would answer its requests any more."""
        try:
            while not self.stopping.is_set():
                try:
                    self._dispatch_once()
                except Exception:  # noqa: BLE001
                    pb_utils.Logger.log_error(f"LLM dispatcher: {traceback.format_exc()}")
                    time.sleep(CANCEL_CHECK_S)
        finally:
            if not self.stopping.is_set():
                self._fail_health("the response dispatcher stopped")

    def _dispatch_once(self):
        newest = {}
        for result in self.engine.results(timeout=CANCEL_CHECK_S):
            newest[result.request_id] = result  # results are cumulative: the newest carries all
        now = time.monotonic()
        if newest:
            self.last_progress = now
        for result in newest.values():
            self._handle(result)
        if now - self.last_cancel_check >= CANCEL_CHECK_S:
            self.last_cancel_check = now
            self._drop_cancelled()
            self._watch(now)
        if now - self.last_gauge_update >= GAUGE_UPDATE_S:
            self.last_gauge_update = now
            self._update_gauges()

    def _watch(self, now):
        if self.unhealthy:
            return
        if not self.engine.alive():
            self._fail_health("the engine loop stopped")
        elif self.active and now - self.last_progress > self.stall_timeout:
            self._fail_health(f"no progress for {now - self.last_progress:.1f} s with {len(self.active)} request(s) in flight")

    def _fail_health(self, why):
        self.unhealthy = why
        pb_utils.Logger.log_error(f"LLM engine unhealthy: {why}; failing requests until this server is restarted")
        self.gauges["healthy"].set(0.0)
        self._fail_all(f"the LLM engine is not healthy ({why}); this server must be restarted")

    def _update_gauges(self):
        """Never fatal: the dispatcher thread carries every response."""
        try:
            stats = self.engine.stats
            for key, gauge in self.gauges.items():
                if key != "healthy":
                    gauge.set(float(stats[key]))
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_warn(f"engine metrics are off: {e}")
            self.gauges = {"healthy": self.gauges["healthy"]}

    def _handle(self, result):
        with self.lock:
            state = self.active.get(result.request_id)
        if state is None or state.done:
            return
        try:
            self._respond(result, state)
        except Exception as e:  # noqa: BLE001  one request's failed send ends that request alone
            pb_utils.Logger.log_warn(f"request {result.request_id}: {type(e).__name__}: {e}; aborted")
            self._finish(result.request_id, state)
            self.engine.cancel(result.request_id)

    def _respond(self, result, state):
        if result.error:
            self._finish(result.request_id, state)
            state.sender.send(error_response(f"generation failed: {result.error}", pb_utils.TritonError.INTERNAL), flags=FINAL)
            return
        tokens = list(result.generated_tokens)
        logprobs = list(result.logprobs or [])
        if tokens and not state.first_token_ns:
            state.first_token_ns = time.time_ns()
        finished = result.is_finished()
        cut = stop_index(tokens, state.stop_words, state.checked - state.holdback)
        state.checked = len(tokens)
        if cut is not None:
            tokens, finished = tokens[:cut], True
            self.engine.cancel(result.request_id)
        if not finished and not state.streaming:
            return
        end = len(tokens)
        if not finished:
            end -= state.holdback
            now = time.monotonic()
            if end <= state.sent or now - state.last_sent < self.stream_interval:
                return  # nothing new, or too soon: these tokens go with the next response
            if state.text is None and self.tokenizer.decode(tokens[state.sent:end]).endswith("\ufffd"):
                return  # a character is split across tokens: wait for the rest of it
            state.last_sent = now
        step = self.stream_max_tokens if state.streaming and self.stream_max_tokens > 0 else max(end - state.sent, 1)
        starts = list(range(state.sent, end, step)) or [state.sent]
        if finished:
            self._finish(result.request_id, state)
        for i, start in enumerate(starts):
            stop = min(start + step, end)
            last = finished and i == len(starts) - 1
            chunk, chunk_logprobs = tokens[start:stop], logprobs[start:stop]
            state.cum_log_prob += float(sum(chunk_logprobs))
            if not state.streaming and not state.exclude_input:
                chunk = state.prompt + chunk
                chunk_logprobs = [0.0] * len(state.prompt) + chunk_logprobs
            state.sent = stop
            response = self._response(chunk, chunk_logprobs, stop - start, state, last, self.engine.reused_blocks(result))
            state.sender.send(response, flags=FINAL if last else 0)

    def _response(self, tokens, logprobs, generated, state, last, reused_blocks):
        n = len(tokens)
        outputs = []
        if state.text is not None:
            if state.streaming:
                text = state.text.push(tokens) + (state.text.finish() if last else "")
            else:
                text = self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)
            outputs.append(tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)))
        if state.counts[0]:
            outputs.append(tensor("num_input_tokens", np.array([[len(state.prompt)]], np.int32)))
        if state.counts[1]:  # this response's own tokens: the OpenAI frontend adds them up
            outputs.append(tensor("num_output_tokens", np.array([[generated]], np.int32)))
        if state.perf:
            outputs += [
                tensor("arrival_time_ns", np.array([[state.arrival_ns]], np.int64)),
                tensor("first_scheduled_time_ns", np.array([[state.arrival_ns]], np.int64)),  # joins the batch at once
                tensor("first_token_time_ns", np.array([[state.first_token_ns]], np.int64)),
                tensor("last_token_time_ns", np.array([[time.time_ns()]], np.int64)),
                tensor("kv_cache_reused_blocks", np.array([[reused_blocks]], np.int32)),
            ]
        return pb_utils.InferenceResponse(
            output_tensors=outputs + [
                tensor("output_ids", np.array(tokens, np.int32).reshape(1, 1, n)),
                tensor("sequence_length", np.array([[n]], np.int32)),
                tensor("cum_log_probs", np.array([[state.cum_log_prob]], np.float32)),
                tensor("output_log_probs", np.array(logprobs if state.return_log_probs else [0.0] * n, np.float32).reshape(1, 1, n)),
                *self.constant_outputs,
            ]
        )

    def _finish(self, request_id, state):
        state.done = True
        with self.lock:
            self.active.pop(request_id, None)

    def _drop_cancelled(self):
        with self.lock:
            items = list(self.active.items())
        for request_id, state in items:
            if state.request.is_cancelled():
                self._finish(request_id, state)
                self.engine.cancel(request_id)
                try:
                    state.sender.send(flags=FINAL)
                except Exception as e:  # noqa: BLE001  the client is gone: nothing to tell it
                    pb_utils.Logger.log_verbose(f"request {request_id}: final response after cancellation not sent: {e}")

    def _fail_all(self, message):
        with self.lock:
            items, self.active = list(self.active.items()), {}
        for request_id, state in items:
            state.done = True
            self.engine.cancel(request_id)
            try:
                state.sender.send(error_response(message, pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
            except Exception as e:  # noqa: BLE001  its client is gone
                pb_utils.Logger.log_verbose(f"request {request_id}: error response not sent: {e}")

    def finalize(self):
        self.stopping.set()
        self.dispatcher.join(timeout=5)
        self._fail_all("the server is shutting down")
        self.engine.stop()
