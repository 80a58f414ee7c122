"""The LLM step on Hugging Face transformers continuous batching.

It speaks the tensor interface of NVIDIA's C++ `tensorrt_llm` model (input_ids, input_lengths,
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

from trtbuild_utils import error_response, load_tokenizer, optional, parameters, scalar, tensor

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
                 "stop_words", "holdback", "sent", "cum_log_prob", "done")

    def __init__(self, sender, request, prompt, streaming, exclude_input, return_log_probs, stop_words):
        self.sender = sender
        self.request = request
        self.prompt = prompt
        self.streaming = streaming
        self.exclude_input = exclude_input
        self.return_log_probs = return_log_probs
        self.stop_words = stop_words
        self.holdback = max((len(w) for w in stop_words), default=1) - 1
        self.sent = 0
        self.cum_log_prob = 0.0
        self.done = False


class TritonPythonModel:
    def initialize(self, args):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        transformers.logging.set_verbosity_error()
        config, p = parameters(args)
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the transformers LLM step must be decoupled")
        device = p["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.max_input_len = int(p["max_input_len"])
        self.max_output_len = int(p["max_output_len"])
        self.max_seq_len = self.max_input_len + self.max_output_len
        self.exclude_input_default = p["exclude_input_in_output"].lower() == "true"
        self.tokenizer = load_tokenizer(p["tokenizer_dir"])
        model = AutoModelForCausalLM.from_pretrained(
            p["checkpoint_dir"], dtype=getattr(torch, p["dtype"]), attn_implementation="sdpa"
        ).to(device).eval()
        self.vocab_size = model.config.vocab_size
        self.default_end_id = self.tokenizer.eos_token_id
        # Sampling processors exist only when their defaults are not neutral; every request then
        # passes its own values (top_k 1 for greedy), so one running batch mixes both kinds.
        self.generation_config = GenerationConfig(
            do_sample=True, temperature=0.5, top_k=50, top_p=0.9, max_new_tokens=self.max_output_len,
            eos_token_id=self.default_end_id, pad_token_id=self.tokenizer.pad_token_id,
        )
        page_size = int(p["kv_cache_page_size"])
        cb = dict(page_size=page_size, per_request_processors=True, return_logprobs=True)
        if device == "cpu":
            cb.update(num_blocks=int(p["kv_cache_num_blocks"]), max_batch_tokens=max(256, self.max_input_len))
        else:
            cb.update(max_memory_percent=float(p["kv_cache_free_gpu_mem_fraction"]))
            if p.get("kv_cache_num_blocks"):
                cb.update(num_blocks=int(p["kv_cache_num_blocks"]))
        self.cb_config = ContinuousBatchingConfig(**cb)
        self.model = model
        self.lock = threading.Lock()
        self.active = {}
        self.stopping = threading.Event()
        self._start_manager()
        self.dispatcher = threading.Thread(target=self._dispatch, name="trtbuild-dispatch", daemon=True)
        self.dispatcher.start()

    def _start_manager(self):
        self.manager = self.model.init_continuous_batching(
            generation_config=self.generation_config, continuous_batching_config=self.cb_config
        )
        self.manager.start()

    def _manager_failed(self):
        status = getattr(self.manager, "background_thread_status", None)
        return not self.manager.is_running() or getattr(status, "fatal_error", None) is not None

    # ---------------------------------------------------------------- requests in
    def execute(self, requests):
        if self._manager_failed():
            self._fail_all("the generation loop stopped; restarting it")
            self.model.destroy_cached_continuous_batching_manager()
            self._start_manager()
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._submit(request, sender)
            except ValueError as e:
                sender.send(error_response(str(e)), flags=FINAL)
        return None

    def _submit(self, request, sender):
        ids = optional(request, "input_ids")
        lengths = optional(request, "input_lengths").reshape(-1)
        if ids.shape[0] != 1:
            raise ValueError(f"send one prompt per request (got a batch of {ids.shape[0]}); batching happens in flight")
        for name, (neutral, why) in UNSUPPORTED.items():
            value = scalar(request, name)
            if value is not None and value not in neutral:
                raise ValueError(f"{name}={value} cannot be honoured: {why}")
        prompt = ids[0, : int(lengths[0])].astype(np.int64).tolist()
        max_tokens = int(scalar(request, "request_output_len"))
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if max_tokens > self.max_output_len or len(prompt) + max_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds this build's limits "
                f"(max_input_len {self.max_input_len}, max_output_len {self.max_output_len})"
            )
        if _words(optional(request, "bad_words_list")):
            raise ValueError("bad_words cannot be honoured by the transformers runtime")
        end_id = int(scalar(request, "end_id", self.default_end_id))
        min_tokens = int(scalar(request, "min_tokens", 0))
        if min_tokens >= max_tokens:
            end_id = -1  # every request generates exactly max_tokens: the benchmark setting
        elif min_tokens > 0:
            raise ValueError("min_tokens must be 0 or >= max_tokens with the transformers runtime")
        sampling = self._sampling(request)
        request_id = uuid.uuid4().hex
        state = _State(
            sender, request, prompt,
            streaming=bool(scalar(request, "streaming", False)),
            exclude_input=bool(scalar(request, "exclude_input_in_output", self.exclude_input_default)),
            return_log_probs=bool(scalar(request, "return_log_probs", False)),
            stop_words=_words(optional(request, "stop_words_list")),
        )
        with self.lock:
            self.active[request_id] = state
        self.manager.add_request(
            prompt, request_id=request_id, max_new_tokens=max_tokens, streaming=True, eos_token_id=end_id, **sampling
        )

    def _sampling(self, request):
        temperature = scalar(request, "temperature")
        top_k = scalar(request, "runtime_top_k")
        top_p = scalar(request, "runtime_top_p")
        greedy = temperature == 0.0 or top_k == 1 or (not top_k and not top_p)
        if greedy:
            return {"top_k": 1, "top_p": 1.0, "temperature": 1.0}
        if scalar(request, "random_seed") is not None:
            raise ValueError("seed cannot be honoured for sampled requests: continuous batching shares one generator")
        if temperature is not None and temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        return {
            "top_k": int(top_k) if top_k else self.vocab_size,
            "top_p": float(top_p) if top_p else 1.0,
            "temperature": float(temperature) if temperature is not None else 1.0,
        }

    # ---------------------------------------------------------------- results out
    def _dispatch(self):
        last_cancel_check = time.monotonic()
        while not self.stopping.is_set():
            result = self.manager.get_result(timeout=0.05)
            if result is not None:
                self._handle(result)
            if time.monotonic() - last_cancel_check > 0.1:
                last_cancel_check = time.monotonic()
                self._drop_cancelled()

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
        cut = _stop_at(tokens, state.stop_words)
        if cut is not None:
            tokens, finished = tokens[:cut], True
            self.manager.cancel_request(result.request_id)
        if not finished and not state.streaming:
            return
        end = len(tokens)
        if not finished:
            end -= state.holdback
            if end > state.sent and self.tokenizer.decode(tokens[state.sent:end]).endswith("\ufffd"):
                return  # a character is split across tokens: wait for the rest of it
            if end <= state.sent:
                return
        chunk = tokens[state.sent:end]
        chunk_logprobs = logprobs[state.sent:end]
        state.cum_log_prob += float(sum(chunk_logprobs))
        if not state.streaming and not state.exclude_input:
            chunk = state.prompt + chunk
            chunk_logprobs = [0.0] * len(state.prompt) + chunk_logprobs
        state.sent = end
        if finished:
            self._finish(result.request_id, state)
        state.sender.send(self._response(chunk, chunk_logprobs, state), flags=FINAL if finished else 0)

    def _response(self, tokens, logprobs, state):
        n = len(tokens)
        return pb_utils.InferenceResponse(
            output_tensors=[
                tensor("output_ids", np.array(tokens, np.int32).reshape(1, 1, n)),
                tensor("sequence_length", np.array([[n]], np.int32)),
                tensor("cum_log_probs", np.array([[state.cum_log_prob]], np.float32)),
                tensor("output_log_probs", np.array(logprobs if state.return_log_probs else [0.0] * n, np.float32).reshape(1, 1, n)),
                tensor("context_logits", np.zeros((1, 1, 1), np.float32)),
                tensor("generation_logits", np.zeros((1, 1, 1, 1), np.float32)),
                tensor("batch_index", np.zeros((1, 1), np.int32)),
                tensor("sequence_index", np.zeros((1, 1), np.int32)),
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


def _words(words):
    """Decode NVIDIA's [1, 2, N] words layout (ids, end offsets) into token sequences."""
    if words is None or words.size == 0:
        return []
    words = words.reshape(-1, 2, words.shape[-1])[0]
    ids, offsets = words[0].tolist(), [o for o in words[1].tolist() if o >= 0]
    out, start = [], 0
    for end in offsets:
        if end > start:
            out.append(ids[start:end])
        start = end
    return out


def _stop_at(tokens, stop_words):
    """Length of the output before the first stop sequence, or None."""
    for i in range(len(tokens)):
        for word in stop_words:
            if tokens[i : i + len(word)] == word:
                return i
    return None
