"""NVIDIA's LLM-API Triton interface served by `tensorrt_llm.LLM` (PyTorch backend).

Inputs: text_input, streaming, sampling_param_* and return_* flags; outputs: text_output and
finish_reason always, stop_reason and cumulative_logprob when asked. Streamed responses carry the new
text only (like the ensemble and BLS), non-streamed ones the whole text. `model.yaml` next to this file
holds the LLM(...) arguments and `triton_config`; initialize() refuses to start when they disagree
with config.pbtxt. Every request runs as a coroutine on one asyncio loop in a background thread, so
the executor batches them in flight; a cancelled request is aborted in the executor.
"""

import asyncio
import os
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild_runtime.backend.llmapi_config import (SAMPLING_INPUTS, check_prompt_length, check_triton_config, clear_mpi_job_environment,
                           load_model_yaml, sampling_kwargs)
from trtbuild_runtime.backend.tensors import error_response, optional, parameters, scalar, strings, tensor

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _Job:
    __slots__ = ("request", "sender", "prompt", "sampling", "streaming", "include_prompt", "flags", "cancelled")

    def __init__(self, request, sender, prompt, sampling, streaming, include_prompt, flags):
        self.request = request
        self.sender = sender
        self.prompt = prompt
        self.sampling = sampling
        self.streaming = streaming
        self.include_prompt = include_prompt
        self.flags = flags
        self.cancelled = False


class TritonPythonModel:
    def initialize(self, args):
        clear_mpi_job_environment(os.environ)  # before tensorrt_llm (and mpi4py) is imported
        from tensorrt_llm import LLM, SamplingParams

        config, params = parameters(args)
        yaml_path = Path(os.environ.get("LLM_CONFIG_PATH") or Path(__file__).parent / "model.yaml")
        llm_args, triton_config = load_model_yaml(yaml_path)
        check_triton_config(config, triton_config)
        try:
            from tensorrt_llm.llmapi.llm_utils import update_llm_args_with_extra_dict

            llm_args = update_llm_args_with_extra_dict({}, llm_args)
        except ImportError:
            pass  # older releases take the nested dicts as they are
        self.SamplingParams = SamplingParams
        self.max_input_len = int(params["max_input_len"])
        self.exclude_input_default = params.get("exclude_input_in_output", "true").lower() == "true"
        self.cancel_check_s = float(triton_config.get("cancellation_check_period_ms", 100)) / 1000.0
        self.llm = LLM(**llm_args)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="trtbuild-llmapi", daemon=True)
        self.thread.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._job(request, sender)
            except ValueError as e:
                sender.send(error_response(str(e)), flags=FINAL)
                continue
            asyncio.run_coroutine_threadsafe(self._run(job), self.loop)
        return None

    def _job(self, request, sender):
        texts = strings(optional(request, "text_input", np.array([], dtype=np.object_)))
        if len(texts) != 1:
            raise ValueError(f"send exactly one text_input per request (got {len(texts)}); batching happens in flight")
        prompt = texts[0]
        check_prompt_length(len(self.llm.tokenizer.encode(prompt)), self.max_input_len)
        values = {}
        for name in SAMPLING_INPUTS:
            if name == "sampling_param_stop":
                stop = optional(request, name)
                values[name] = None if stop is None else strings(stop)
            else:
                values[name] = scalar(request, name)
        sampling = self.SamplingParams(**sampling_kwargs(values))
        exclude = scalar(request, "sampling_param_exclude_input_from_output")
        flags = {f: bool(scalar(request, f, False)) for f in ("return_stop_reason", "return_cumulative_logprob")}
        return _Job(request, sender, prompt, sampling, bool(scalar(request, "streaming", False)),
                    not (self.exclude_input_default if exclude is None else bool(exclude)), flags)

    async def _run(self, job):
        watcher = None
        try:
            result = self.llm.generate_async(job.prompt, sampling_params=job.sampling, streaming=job.streaming)
            watcher = asyncio.ensure_future(self._watch(job, result))
            prefix = job.prompt if job.include_prompt else ""
            if job.streaming:
                async for output in result:
                    if job.cancelled:
                        break
                    completion = output.outputs[0]
                    done = bool(output.finished)
                    job.sender.send(self._response(job, prefix + completion.text_diff, completion), flags=FINAL if done else 0)
                    prefix = ""
                    if done:
                        return
            else:
                output = await result.aresult()
                if not job.cancelled:
                    completion = output.outputs[0]
                    job.sender.send(self._response(job, prefix + completion.text, completion), flags=FINAL)
                    return
            job.sender.send(flags=FINAL)  # cancelled: close the stream without output
        except Exception as e:  # noqa: BLE001 - every failure goes back to the client
            job.sender.send(error_response(f"generation failed: {e}", pb_utils.TritonError.INTERNAL), flags=FINAL)
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _watch(self, job, result):
        while not job.cancelled:
            await asyncio.sleep(self.cancel_check_s)
            if job.request.is_cancelled():
                job.cancelled = True
                result.abort()

    def _response(self, job, text, completion):
        outputs = [
            tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            tensor("finish_reason", np.array([str(completion.finish_reason or "").encode()], dtype=np.object_)),
        ]
        if job.flags["return_stop_reason"]:
            outputs.append(tensor("stop_reason", np.array([str(completion.stop_reason or "").encode()], dtype=np.object_)))
        if job.flags["return_cumulative_logprob"]:
            value = completion.cumulative_logprob
            outputs.append(tensor("cumulative_logprob", np.array([value if value is not None else np.nan], np.float32)))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def finalize(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.llm.shutdown()
