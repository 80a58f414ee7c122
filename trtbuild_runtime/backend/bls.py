"""Business Logic Scripting alternative to the ensemble.

Each request runs on a worker thread of its own (the pool holds twice the LLM step's max batch
size, so no fixed cap below the batch): preprocessing, then the LLM step's decoupled stream, read
as it arrives. Text is detokenized here, incrementally (trtbuild_runtime.backend.tokenizer.IncrementalDecoder): no
call to postprocessing per token, linear in the output, and the streamed chunks concatenate
exactly to the non-streamed text.

Why threads and not `async def execute` with `await async_exec(decoupled=True)`: Triton 2.51's
response iterator blocks, so an async model must still read it on threads, and that mix corrupted
the stub's heap at 16 concurrent streams ("corrupted size vs. prev_size"; the stub dies and its
streams never end). Threads alone died too, at 64 streams; one lock over all work on responses,
released only while waiting for the next one, and owned copies of their outputs keep it alive at
64 streams on CPU, not at 256 (bench/README.md): the fault is not found yet. The caller's queue timeout goes with every call, as an ensemble does; its
priority cannot (`pb_utils.InferenceRequest` has no priority argument), so priority acts in this
model's own queue.
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild_runtime.backend.tokenizer import IncrementalDecoder, load_tokenizer
from trtbuild_runtime.backend.tensors import error_response, optional, parameters, scalar, tensor

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PREPROCESSING_INPUTS = {
    "QUERY": "text_input",
    "REQUEST_OUTPUT_LEN": "max_tokens",
    "BAD_WORDS_DICT": "bad_words",
    "STOP_WORDS_DICT": "stop_words",
    "END_ID": "end_id",
    "PAD_ID": "pad_id",
}
PREPROCESSED = {
    "input_ids": "INPUT_ID",
    "input_lengths": "REQUEST_INPUT_LEN",
    "request_output_len": "REQUEST_OUTPUT_LEN",
    "end_id": "OUT_END_ID",
    "pad_id": "OUT_PAD_ID",
    "stop_words_list": "STOP_WORDS_IDS",
    "bad_words_list": "BAD_WORDS_IDS",
}
PASSTHROUGH_OUTPUTS = ("cum_log_probs", "output_log_probs", "context_logits", "generation_logits", "batch_index", "sequence_index")


class TritonPythonModel:
    def initialize(self, args):
        _, params = parameters(args)
        self.preprocessing = params["preprocessing_model"]
        self.llm = params["llm_model"]
        self.direct_inputs = json.loads(params["llm_input_map"])  # llm input -> our input
        self.tokenizer = load_tokenizer(params["tokenizer_dir"])
        self.skip_special_tokens = params.get("skip_special_tokens", "true").lower() == "true"
        self.lock = threading.Lock()  # one thread at a time touches responses, the tokenizer and the senders
        self.workers = ThreadPoolExecutor(max_workers=int(params.get("max_inflight", "64")), thread_name_prefix="bls")

    def execute(self, requests):
        for request in requests:
            self.workers.submit(self._serve, request, request.get_response_sender())
        return None

    def _serve(self, request, sender):
        try:
            self._run(request, sender)
        except Exception as e:  # noqa: BLE001 - reported to the client: every stream gets its final response
            sender.send(error_response(str(e)), flags=FINAL)

    def finalize(self):
        self.workers.shutdown(wait=True, cancel_futures=True)

    def _request(self, model, inputs, timeout):
        return pb_utils.InferenceRequest(model_name=model, inputs=[i for i in inputs if i is not None],
                                         requested_output_names=[], timeout=timeout)

    def _run(self, request, sender):
        streaming = bool(scalar(request, "stream", False))
        timeout = request.timeout()  # microseconds; 0: the called model's own default
        pre = self._request(self.preprocessing, [_forward(request, ours, theirs) for theirs, ours in PREPROCESSING_INPUTS.items()],
                            timeout).exec()
        if pre.has_error():
            raise RuntimeError(pre.error().message())
        llm_inputs = [pb_utils.Tensor(name, pb_utils.get_output_tensor_by_name(pre, src).as_numpy()) for name, src in PREPROCESSED.items()]
        llm_inputs += [_forward(request, ours, theirs) for theirs, ours in self.direct_inputs.items()]
        decoder = IncrementalDecoder(self.tokenizer, self.skip_special_tokens)
        responses = self._request(self.llm, llm_inputs, timeout).exec(decoupled=True)
        with self.lock:
            got_any = False
            for response in _unlocked(responses, self.lock):
                if response.has_error():
                    raise RuntimeError(response.error().message())
                outputs = _copies(response)  # owned copies, read at once: the stream's buffers go when it ends
                if "output_ids" not in outputs:
                    continue  # an empty final response
                tokens = outputs.pop("output_ids").reshape(-1).tolist()
                got_any = True
                if not streaming:
                    text = self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)
                    sender.send(_reply(text, outputs), flags=FINAL)
                    return
                sender.send(_reply(decoder.push(tokens), outputs))
            if not got_any:
                raise RuntimeError(f"{self.llm} ended the stream without a response")
            rest = decoder.finish()
            if rest:
                sender.send(_reply(rest, {}))
            sender.send(flags=FINAL)  # as NVIDIA's BLS: the stream ends with an empty final response

def _copies(response):
    """The response's outputs we use, as numpy arrays of our own."""
    copies = {}
    for name in ("output_ids", *PASSTHROUGH_OUTPUTS):
        t = pb_utils.get_output_tensor_by_name(response, name)
        if t is not None:
            copies[name] = np.array(t.as_numpy(), copy=True)
    return copies


def _reply(text, outputs):
    tensors = [tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
    tensors += [pb_utils.Tensor(name, value) for name, value in outputs.items()]
    return pb_utils.InferenceResponse(output_tensors=tensors)


def _unlocked(responses, lock):
    """Iterate the LLM step's stream, releasing the model's lock only while waiting for the next response."""
    iterator = iter(responses)
    while True:
        lock.release()
        try:
            response = next(iterator, None)
        finally:
            lock.acquire()
        if response is None:
            return
        yield response


def _forward(request, ours, theirs):
    value = optional(request, ours)
    return None if value is None else pb_utils.Tensor(theirs, value)
