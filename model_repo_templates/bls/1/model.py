"""Business Logic Scripting alternative to the ensemble, on the asynchronous BLS API.

Each request is a coroutine: preprocessing and the LLM step are awaited (`async_exec`), so one
instance keeps every request of the LLM's batch moving, and no thread waits on a model. The LLM
step's streamed responses are read on a worker thread (Triton 2.51's response iterator blocks)
and handed back to the coroutine. Text is detokenized here, incrementally
(trtbuild_tokenizer.IncrementalDecoder): no call to postprocessing per token, linear in the output,
and the streamed chunks concatenate exactly to the non-streamed text. The caller's queue timeout
goes with every call it makes, as an ensemble does; its priority cannot (Triton 2.51's
`pb_utils.InferenceRequest` has no priority argument), so priority acts in this model's own queue.
"""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild_tokenizer import IncrementalDecoder, load_tokenizer
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
_DONE = object()


class TritonPythonModel:
    def initialize(self, args):
        _, params = parameters(args)
        self.preprocessing = params["preprocessing_model"]
        self.llm = params["llm_model"]
        self.direct_inputs = json.loads(params["llm_input_map"])  # llm input -> our input
        self.tokenizer = load_tokenizer(params["tokenizer_dir"])
        self.skip_special_tokens = params.get("skip_special_tokens", "true").lower() == "true"
        self.readers = ThreadPoolExecutor(max_workers=int(params.get("max_inflight", "64")), thread_name_prefix="bls-read")

    async def execute(self, requests):
        await asyncio.gather(*(self._serve(request, request.get_response_sender()) for request in requests))
        return None

    async def _serve(self, request, sender):
        try:
            await self._run(request, sender)
        except Exception as e:  # noqa: BLE001 - reported to the client: every stream gets its final response
            sender.send(error_response(str(e)), flags=FINAL)

    def finalize(self):
        self.readers.shutdown(wait=True, cancel_futures=True)

    def _request(self, model, inputs, timeout):
        return pb_utils.InferenceRequest(model_name=model, inputs=[i for i in inputs if i is not None],
                                         requested_output_names=[], timeout=timeout)

    async def _responses(self, request):
        """The LLM step's responses as they arrive, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        responses = iter(await request.async_exec(decoupled=True))
        while True:
            response = await loop.run_in_executor(self.readers, next, responses, _DONE)
            if response is _DONE:
                return
            yield response

    async def _run(self, request, sender):
        streaming = bool(scalar(request, "stream", False))
        timeout = request.timeout()  # microseconds; 0: the called model's own default
        pre = await self._request(self.preprocessing, [_forward(request, ours, theirs) for theirs, ours in PREPROCESSING_INPUTS.items()],
                                  timeout).async_exec()
        if pre.has_error():
            raise RuntimeError(pre.error().message())
        llm_inputs = [pb_utils.Tensor(name, pb_utils.get_output_tensor_by_name(pre, src).as_numpy()) for name, src in PREPROCESSED.items()]
        llm_inputs += [_forward(request, ours, theirs) for theirs, ours in self.direct_inputs.items()]
        decoder = IncrementalDecoder(self.tokenizer, self.skip_special_tokens)
        last = None
        async for response in self._responses(self._request(self.llm, llm_inputs, timeout)):
            if response.has_error():
                raise RuntimeError(response.error().message())
            ids = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if ids is None:
                continue  # an empty final response
            tokens = ids.as_numpy().reshape(-1).tolist()
            last = response
            if not streaming:
                text = self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)
                sender.send(self._reply(text, response), flags=FINAL)
                return
            sender.send(self._reply(decoder.push(tokens), response))
        if last is None:
            raise RuntimeError(f"{self.llm} ended the stream without a response")
        rest = decoder.finish()
        if rest:
            sender.send(self._reply(rest, last))
        sender.send(flags=FINAL)  # as NVIDIA's BLS: the stream ends with an empty final response

    def _reply(self, text, response):
        outputs = [tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        outputs += [pb_utils.Tensor(n, pb_utils.get_output_tensor_by_name(response, n).as_numpy()) for n in PASSTHROUGH_OUTPUTS
                    if pb_utils.get_output_tensor_by_name(response, n) is not None]
        return pb_utils.InferenceResponse(output_tensors=outputs)


def _forward(request, ours, theirs):
    value = optional(request, ours)
    return None if value is None else pb_utils.Tensor(theirs, value)
