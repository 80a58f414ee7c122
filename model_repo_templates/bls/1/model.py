"""Business Logic Scripting alternative to the ensemble.

It calls preprocessing, the LLM step and postprocessing itself. When streaming it detokenizes the
tokens accumulated so far and sends only the new text, so characters and spaces that span tokens
come out exactly as in the non-streamed text. The caller's queue timeout goes with every call it
makes, as an ensemble does; its priority cannot (Triton 2.51's `pb_utils.InferenceRequest` has no
priority argument), so priority acts in this model's own queue (builder.serving).
"""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild_utils import error_response, optional, parameters, scalar, tensor

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
        self.postprocessing = params["postprocessing_model"]
        self.direct_inputs = json.loads(params["llm_input_map"])  # llm input -> our input
        self.accumulate = params.get("accumulate_tokens", "true").lower() == "true"
        # Decoupled: execute() hands each request to a worker and returns, so one instance keeps
        # up to max_inflight requests moving instead of serving them one at a time.
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_inflight", "64")), thread_name_prefix="bls")

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._serve, request, request.get_response_sender())
        return None

    def _serve(self, request, sender):
        try:
            self._run(request, sender)
        except Exception as e:  # noqa: BLE001 - reported to the client, never swallowed
            sender.send(error_response(str(e)), flags=FINAL)

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _call(self, model, inputs, timeout, decoupled=False):
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[i for i in inputs if i is not None],
            requested_output_names=[],
            timeout=timeout,
        )
        return request.exec(decoupled=decoupled)

    def _run(self, request, sender):
        streaming = bool(scalar(request, "stream", False))
        timeout = request.timeout()  # microseconds; 0: the called model's own default
        pre = self._call(self.preprocessing, [_forward(request, ours, theirs) for theirs, ours in PREPROCESSING_INPUTS.items()],
                         timeout)
        if pre.has_error():
            raise RuntimeError(pre.error().message())
        llm_inputs = [pb_utils.Tensor(name, pb_utils.get_output_tensor_by_name(pre, src).as_numpy()) for name, src in PREPROCESSED.items()]
        llm_inputs += [_forward(request, ours, theirs) for theirs, ours in self.direct_inputs.items()]
        tokens = np.zeros((1, 1, 0), np.int32)
        text_so_far = ""
        for response in self._call(self.llm, llm_inputs, timeout, decoupled=True):
            if response.has_error():
                raise RuntimeError(response.error().message())
            ids = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if ids is None:
                continue  # the empty final response
            chunk = ids.as_numpy()
            tokens = np.concatenate([tokens, chunk], axis=-1) if (streaming and self.accumulate) else chunk
            text = self._detokenize(tokens, timeout)
            delta = text[len(text_so_far):] if (streaming and self.accumulate) else text
            text_so_far = text
            outputs = [tensor("text_output", np.array([delta.encode("utf-8")], dtype=np.object_))]
            outputs += [pb_utils.Tensor(n, pb_utils.get_output_tensor_by_name(response, n).as_numpy()) for n in PASSTHROUGH_OUTPUTS
                        if pb_utils.get_output_tensor_by_name(response, n) is not None]
            reply = pb_utils.InferenceResponse(output_tensors=outputs)
            sender.send(reply, flags=0 if streaming else FINAL)
        if streaming:
            sender.send(flags=FINAL)

    def _detokenize(self, tokens, timeout):
        lengths = np.array([[tokens.shape[-1]]], np.int32)
        post = self._call(self.postprocessing, [pb_utils.Tensor("TOKENS_BATCH", tokens), pb_utils.Tensor("SEQUENCE_LENGTH", lengths)],
                          timeout)
        if post.has_error():
            raise RuntimeError(post.error().message())
        return pb_utils.get_output_tensor_by_name(post, "OUTPUT").as_numpy().reshape(-1)[0].decode("utf-8")


def _forward(request, ours, theirs):
    value = optional(request, ours)
    return None if value is None else pb_utils.Tensor(theirs, value)
