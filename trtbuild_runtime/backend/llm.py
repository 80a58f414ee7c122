"""The LLM step: trtbuild_runtime (the Llama family) or Hugging Face transformers continuous batching.

It also answers text directly (`text_input` in, `text_output` out, the ensemble's input names),
as Triton's vLLM model does: one model and one hop for streaming clients, detokenized
incrementally in this process. Streamed tokens are coalesced: when the engine produces them faster
than responses are sent, one response carries every token accumulated since the last, bounded by
`stream_interval_ms` and `stream_max_tokens` (1: one token per response); the concatenated text
never changes.

The `engine` parameter says which, chosen when the repository was generated (trtbuild.json says
why). Both are driven through the same calls (add_request, cancel_request, get_result), so every
input below means the same on either. It speaks the tensor interface of NVIDIA's C++ `tensorrt_llm` model (input_ids, input_lengths,
request_output_len, streaming, runtime_top_k, ... -> output_ids, sequence_length, log-probs), so
the same preprocessing, postprocessing, ensemble and BLS serve it. Requests join and leave the
running batch at every step (in-flight batching) and their KV cache lives in fixed-size pages.
One dispatcher thread turns the manager's results into Triton responses.
"""

import threading
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild_runtime.backend import hf_engine
from trtbuild_runtime.config import resolve_device
from trtbuild_runtime.backend.tokenizer import IncrementalDecoder, load_tokenizer
from trtbuild_runtime.backend.tensors import MISSING_OUTPUT_LEN, error_response, optional, parameters, scalar, stop_index, strings, tensor, words_list

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

# Inputs this runtime cannot honour, with the value(s) that mean "off" and what to do instead.
UNSUPPORTED = {
    "beam_width": ((1,), "beam search is not supported by the transformers runtime; send beam_width 1"),
    "num_return_sequences": ((1,), "send one request per sequence (num_return_sequences 1)"),
    "len_penalty": ((1.0,), "length_penalty only applies to beam search, which this runtime does not run"),
    "repetition_penalty": ((1.0,), "repetition_penalty is not supported by transformers continuous batching"),
    "presence_penalty": ((0.0,), "presence_penalty is not supported by transformers continuous batching"),
    "frequency_penalty": ((0.0,), "frequency_penalty is not supported by transformers continuous batching"),
    "return_context_logits": ((False,), "context logits are not returned by this runtime"),
    "return_generation_logits": ((False,), "generation logits are not returned by this runtime"),
    "stop": ((False,), "cancel a request by closing its stream instead of sending stop"),
}


class _State:
    """One request in flight."""

    __slots__ = ("sender", "request", "prompt", "streaming", "exclude_input", "return_log_probs",
                 "stop_words", "holdback", "sent", "checked", "cum_log_prob", "done", "text", "last_sent")

    def __init__(self, sender, request, prompt, streaming, exclude_input, return_log_probs, stop_words, text=None):
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


class TritonPythonModel:
    def initialize(self, args):
        import transformers

        transformers.logging.set_verbosity_error()
        config, p = parameters(args)
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the transformers LLM step must be decoupled")
        self.max_batch_size = max(1, int(config.get("max_batch_size", 1)))
        self.max_input_len = int(p["max_input_len"])
        self.max_output_len = int(p["max_output_len"])
        self.max_seq_len = self.max_input_len + self.max_output_len
        self.exclude_input_default = p["exclude_input_in_output"].lower() == "true"
        self.tokenizer = load_tokenizer(p["tokenizer_dir"])
        self.default_end_id = self.tokenizer.eos_token_id
        self.engine = p.get("engine", "transformers")
        self.params = p
        pb_utils.Logger.log_info(f"LLM engine: {self.engine} ({p.get('engine_reason', '')})")
        if self.engine == "trtbuild":
            from trtbuild_runtime.config import read_hf_config

            self.vocab_size = int(read_hf_config(p["checkpoint_dir"])["vocab_size"])
        else:
            self.model = hf_engine.load_model(p["checkpoint_dir"], p["dtype"], p["device"], p.get("quantization", "none"))
            self.vocab_size = self.model.config.vocab_size
        self.cb_options = dict(
            eos_token_id=self.default_end_id, pad_token_id=self.tokenizer.pad_token_id,
            max_input_len=self.max_input_len, max_output_len=self.max_output_len,
            page_size=int(p["kv_cache_page_size"]), num_blocks=int(p["kv_cache_num_blocks"]),
            free_gpu_mem_fraction=float(p["kv_cache_free_gpu_mem_fraction"]),
        )
        self.add_special_tokens = p.get("add_special_tokens", "true").lower() == "true"
        self.skip_special_tokens = p.get("skip_special_tokens", "true").lower() == "true"
        self.stream_interval = float(p.get("stream_interval_ms", "0")) / 1e3
        self.stream_max_tokens = int(p.get("stream_max_tokens", "0"))
        # outputs that never change, built once: a response costs a few tensors, not eight
        self.constant_outputs = (
            tensor("context_logits", np.zeros((1, 1, 1), np.float32)),
            tensor("generation_logits", np.zeros((1, 1, 1, 1), np.float32)),
            tensor("batch_index", np.zeros((1, 1), np.int32)),
            tensor("sequence_index", np.zeros((1, 1), np.int32)),
        )
        self.lock = threading.Lock()
        self.active = {}
        self.stopping = threading.Event()
        self._start_manager()
        self.gauges = self._engine_gauges(args["model_name"]) if self.engine == "trtbuild" else {}
        self.dispatcher = threading.Thread(target=self._dispatch, name="trtbuild-dispatch", daemon=True)
        self.dispatcher.start()

    def _start_manager(self):
        if self.engine == "trtbuild":
            self.manager = self._start_trtbuild_engine()
            self.per_request_sampling = True
            return
        self.manager, self.per_request_sampling, dropped = hf_engine.continuous_batching(self.model, **self.cb_options)
        if dropped:
            pb_utils.Logger.log_warn(f"ContinuousBatchingConfig of this transformers version ignores {dropped}")

    def _start_trtbuild_engine(self):
        from trtbuild_runtime import EngineConfig, EngineLoop, LLMEngine

        p = self.params
        device = resolve_device(p["device"])
        config = EngineConfig.from_parameters(
            p, model=p["checkpoint_dir"], device=device, max_batch_size=self.max_batch_size, max_seq_len=self.max_seq_len,
            kv_cache_num_blocks=int(p["kv_cache_num_blocks"]) if device == "cpu" else None)
        engine = LLMEngine(config)
        r = engine.runner
        pb_utils.Logger.log_info(f"trtbuild_runtime: {r.num_blocks} KV blocks of {config.kv_cache_page_size} tokens ({r.kv_dtype}) on "
                                 f"{r.device} ({r.dtype}, quantization {r.quantization}), speculative {config.speculative_decoding_mode}, "
                                 f"CUDA graphs for {sorted(r.graphs)}")
        return EngineLoop(engine).start()

    # the engine's own counters, next to Triton's metrics on :8002/metrics
    ENGINE_GAUGES = {
        "prefix_cache_hit_rate": ("trtbuild_prefix_cache_hit_ratio", "Prompt tokens served from the prefix cache, of those looked up"),
        "speculative_acceptance_rate": ("trtbuild_speculative_acceptance_ratio", "Draft tokens the target model accepted"),
        "speculative_tokens_per_step": ("trtbuild_speculative_tokens_per_step", "Tokens a drafted sequence gains per verify step"),
        "free_blocks": ("trtbuild_kv_cache_free_blocks", "KV-cache blocks not held by a running sequence"),
        "preemptions": ("trtbuild_preemptions", "Sequences preempted for lack of KV blocks, since start"),
    }

    def _engine_gauges(self, model_name):
        """A Metric dies with its MetricFamily: both are kept, the families on the model."""
        self.metric_families, gauges = [], {}
        for key, (name, description) in self.ENGINE_GAUGES.items():
            family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.GAUGE)
            self.metric_families.append(family)
            gauges[key] = family.Metric(labels={"model": model_name})
        return gauges

    def _update_gauges(self):
        """Never fatal: the dispatcher thread carries every response."""
        try:
            stats = self.manager.engine.stats
            for key, gauge in self.gauges.items():
                gauge.set(float(stats[key]))
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_warn(f"engine metrics are off: {e}")
            self.gauges = {}

    def _manager_failed(self):
        if self.engine == "trtbuild":
            return not self.manager.is_running()
        status = getattr(self.manager, "background_thread_status", None)
        return not self.manager.is_running() or getattr(status, "fatal_error", None) is not None

    def _restart_manager(self):
        if self.engine == "trtbuild":
            self.manager.stop(block=True, timeout=10)
        else:
            self.model.destroy_cached_continuous_batching_manager()
        self._start_manager()

    # ---------------------------------------------------------------- requests in
    def execute(self, requests):
        if self._manager_failed():
            self._fail_all("the generation loop stopped; restarting it")
            self._restart_manager()
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._submit(request, sender)
            except ValueError as e:
                sender.send(error_response(str(e)), flags=FINAL)
        return None

    def _prompt(self, request):
        """Token ids from input_ids/input_lengths (the ensemble's LLM step) or text_input (one model)."""
        text = optional(request, "text_input")
        if text is not None:
            (query,) = strings(text)[:1] or [""]
            ids = self.tokenizer.encode(query, add_special_tokens=self.add_special_tokens)
            if len(ids) > self.max_input_len:
                raise ValueError(f"prompt has {len(ids)} tokens, more than max_input_len={self.max_input_len} this build allows")
            return np.array([ids], np.int64), np.array([len(ids)]), True
        ids = optional(request, "input_ids")
        if ids is None:
            raise ValueError("send text_input, or input_ids with input_lengths")
        lengths = optional(request, "input_lengths")
        if lengths is None:
            raise ValueError("input_lengths is required with input_ids")
        return ids, lengths.reshape(-1), False

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
        ids, lengths, as_text = self._prompt(request)
        if ids.shape[0] != 1:
            raise ValueError(f"send one prompt per request (got a batch of {ids.shape[0]}); batching happens in flight")
        for name, (neutral, why) in UNSUPPORTED.items():
            value = scalar(request, name)
            if value is not None and value not in neutral:
                raise ValueError(f"{name}={value} cannot be honoured: {why}")
        prompt = ids[0, : int(lengths[0])].astype(np.int64).tolist()
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {self.vocab_size})")
        if not prompt:
            raise ValueError("the prompt is empty (input_lengths 0)")
        max_tokens = self._first(request, "request_output_len", "max_tokens")
        if max_tokens is None or int(max_tokens) == MISSING_OUTPUT_LEN:
            raise ValueError("request_output_len (max_tokens) is required")
        max_tokens = int(max_tokens)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if max_tokens > self.max_output_len or len(prompt) + max_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds this build's limits "
                f"(max_input_len {self.max_input_len}, max_output_len {self.max_output_len})"
            )
        if words_list(optional(request, "bad_words_list")) or any(strings(optional(request, "bad_words", np.array([], object)))):
            raise ValueError("bad_words cannot be honoured by the transformers runtime")
        end_id = int(scalar(request, "end_id", self.default_end_id))
        if not 0 <= end_id < self.vocab_size:
            raise ValueError(f"end_id {end_id} is outside the vocabulary [0, {self.vocab_size})")
        min_tokens = int(scalar(request, "min_tokens", 0))
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        values = {"temperature": scalar(request, "temperature"), "top_k": self._first(request, "runtime_top_k", "top_k"),
                  "top_p": self._first(request, "runtime_top_p", "top_p"), "seed": scalar(request, "seed")}
        hf_engine.check_sampling(self.vocab_size, **values)
        request_id = uuid.uuid4().hex
        state = _State(
            sender, request, prompt,
            streaming=bool(self._first(request, "streaming", "stream")),
            exclude_input=bool(scalar(request, "exclude_input_in_output", self.exclude_input_default)),
            return_log_probs=bool(scalar(request, "return_log_probs", False)),
            stop_words=self._stop_words(request),
            text=IncrementalDecoder(self.tokenizer, self.skip_special_tokens) if as_text else None,
        )
        if self.engine == "trtbuild":
            from trtbuild_runtime import SamplingParams

            params = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, end_ids=(end_id,),
                                    logprobs=state.return_log_probs, **hf_engine.engine_sampling(**values))
            with self.lock:
                self.active[request_id] = state
            try:
                self.manager.add_request(request_id, prompt, params)  # validated here: a bad request never joins
            except ValueError:
                self._finish(request_id, state)
                raise
            return
        if min_tokens >= max_tokens:
            end_id = -1  # every request generates exactly max_tokens: the benchmark setting
        elif min_tokens > 0:
            raise ValueError("min_tokens must be 0 or >= max_tokens with the transformers engine")
        seed = values.pop("seed")
        sampling = hf_engine.sampling_kwargs(self.per_request_sampling, self.vocab_size, **values)
        if sampling.get("top_k", 1) != 1 and seed is not None:
            raise ValueError("seed cannot be honoured for sampled requests by the transformers engine: it shares one generator")
        with self.lock:
            self.active[request_id] = state
        self.manager.add_request(
            prompt, request_id=request_id, max_new_tokens=max_tokens, streaming=True, eos_token_id=end_id, **sampling
        )

    # ---------------------------------------------------------------- results out
    def _results(self):
        """Every result waiting, the newest per request only: results are cumulative, so a newer one
        carries everything an older one did (this is where streamed tokens coalesce)."""
        if self.engine == "trtbuild":
            results = self.manager.get_results(timeout=0.05)
        else:
            result = self.manager.get_result(timeout=0.05)
            results = [] if result is None else [result]
        newest = {}
        for result in results:
            newest[result.request_id] = result
        return newest.values()

    def _dispatch(self):
        last_cancel_check = time.monotonic()
        while not self.stopping.is_set():
            for result in self._results():
                self._handle(result)
            if time.monotonic() - last_cancel_check > 0.1:
                last_cancel_check = time.monotonic()
                self._drop_cancelled()
                if self.gauges:
                    self._update_gauges()

    def _handle(self, result):
        with self.lock:
            state = self.active.get(result.request_id)
        if state is None or state.done:
            return
        if result.error:
            self._finish(result.request_id, state)
            state.sender.send(error_response(f"generation failed: {result.error}", pb_utils.TritonError.INTERNAL), flags=FINAL)
            return
        tokens = list(result.generated_tokens)
        logprobs = list(result.logprobs or [])
        finished = result.is_finished()
        cut = stop_index(tokens, state.stop_words, state.checked - state.holdback)
        state.checked = len(tokens)
        if cut is not None:
            tokens, finished = tokens[:cut], True
            self.manager.cancel_request(result.request_id)
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
            state.sender.send(self._response(chunk, chunk_logprobs, state, last), flags=FINAL if last else 0)

    def _response(self, tokens, logprobs, state, last=False):
        n = len(tokens)
        outputs = []
        if state.text is not None:
            if state.streaming:
                text = state.text.push(tokens) + (state.text.finish() if last else "")
            else:
                text = self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)
            outputs.append(tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)))
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
                self.manager.cancel_request(request_id)
                state.sender.send(flags=FINAL)

    def _fail_all(self, message):
        with self.lock:
            items, self.active = list(self.active.items()), {}
        for _, state in items:
            state.done = True
            state.sender.send(error_response(message, pb_utils.TritonError.INTERNAL), flags=FINAL)

    def finalize(self):
        self.stopping.set()
        self.dispatcher.join(timeout=5)
        self._fail_all("the server is shutting down")
        self.manager.stop(block=True, timeout=10)
