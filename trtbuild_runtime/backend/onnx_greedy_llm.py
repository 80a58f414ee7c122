"""Greedy decoding with the KV cache over an ONNX step model.

It speaks the tensor interface of NVIDIA's `tensorrt_llm` model (input_ids, input_lengths,
request_output_len, end_id, ... -> output_ids, sequence_length, log-probs), so the shared
preprocessing, postprocessing and ensemble serve it. Every prompt of the requests Triton batches
together is left-padded into one batch; each step calls the ONNX model (`step_model`) through BLS
with the tokens, attention mask, positions and the cache, and gets logits and the grown cache
back. Finished sequences leave the batch. The model is not decoupled: one response per request.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild_runtime.backend.tensors import MISSING_OUTPUT_LEN, error_response, optional, parameters, scalar, stop_index, tensor, words_list

TRITON_TO_NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16}

# Inputs this model cannot honour, with the value(s) that mean "off" and what to do instead.
UNSUPPORTED = {
    "beam_width": ((1,), "beam search is not supported by the ONNX runtimes; send beam_width 1"),
    "num_return_sequences": ((1,), "send one request per sequence (num_return_sequences 1)"),
    "streaming": ((False,), "this model is not decoupled: send stream false"),
    "return_context_logits": ((False,), "context logits are not returned by the ONNX runtimes"),
    "return_generation_logits": ((False,), "generation logits are not returned by the ONNX runtimes"),
    "repetition_penalty": ((1.0,), "repetition_penalty is not supported by greedy ONNX decoding"),
    "presence_penalty": ((0.0,), "presence_penalty is not supported by greedy ONNX decoding"),
    "frequency_penalty": ((0.0,), "frequency_penalty is not supported by greedy ONNX decoding"),
    "len_penalty": ((1.0,), "length_penalty only applies to beam search"),
}


class _Row:
    """One prompt of one request."""

    __slots__ = ("request", "prompt", "max_tokens", "end_id", "min_tokens", "stop_words", "tokens", "logprobs", "done")

    def __init__(self, request, prompt, max_tokens, end_id, min_tokens, stop_words):
        self.request, self.prompt, self.max_tokens = request, prompt, max_tokens
        self.end_id, self.min_tokens, self.stop_words = end_id, min_tokens, stop_words
        self.tokens, self.logprobs, self.done = [], [], False


class TritonPythonModel:
    def initialize(self, args):
        _, p = parameters(args)
        self.step_model = p["step_model"]
        self.num_layers = int(p["num_layers"])
        self.kv_heads = int(p["num_kv_heads"])
        self.head_dim = int(p["head_dim"])
        self.past_dtype = TRITON_TO_NUMPY[p["past_dtype"]]
        self.max_input_len = int(p["max_input_len"])
        self.max_output_len = int(p["max_output_len"])
        self.default_end_id = int(p["end_id"])
        self.pad_id = int(p["pad_id"])
        self.exclude_input_default = p["exclude_input_in_output"] == "true"
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def execute(self, requests):
        responses = [None] * len(requests)
        rows = []
        for index, request in enumerate(requests):
            try:
                rows.append((index, self._rows(request)))
            except ValueError as e:
                responses[index] = error_response(str(e))
        if rows:
            try:
                self._generate([row for _, rs in rows for row in rs])
                for index, rs in rows:
                    responses[index] = self._response(requests[index], rs)
            except Exception as e:  # noqa: BLE001 - reported to every client of the batch
                for index, _ in rows:
                    responses[index] = error_response(f"generation failed: {e}", pb_utils.TritonError.INTERNAL)
        return responses

    # ---------------------------------------------------------------- requests in
    def _rows(self, request):
        for name, (neutral, why) in UNSUPPORTED.items():
            value = scalar(request, name)
            if value is not None and value not in neutral:
                raise ValueError(f"{name}={value} cannot be honoured: {why}")
        top_k, top_p, temperature = (scalar(request, n) for n in ("runtime_top_k", "runtime_top_p", "temperature"))
        if temperature != 0.0 and ((top_k or 0) > 1 or (top_p is not None and 0.0 < top_p < 1.0)):
            raise ValueError("sampling (top_k > 1 or top_p < 1) is not supported: the ONNX runtimes decode greedily")
        if words_list(optional(request, "bad_words_list")):
            raise ValueError("bad_words cannot be honoured by the ONNX runtimes")
        ids = optional(request, "input_ids")
        lengths = optional(request, "input_lengths").reshape(-1)
        max_tokens = np.asarray(optional(request, "request_output_len")).reshape(-1)
        if (max_tokens == MISSING_OUTPUT_LEN).any():
            raise ValueError("request_output_len (max_tokens) is required")
        end_ids = _per_row(optional(request, "end_id"), len(ids), self.default_end_id)
        min_tokens = int(scalar(request, "min_tokens", 0))
        stop_words = words_list(optional(request, "stop_words_list"))
        rows = []
        for b in range(len(ids)):
            prompt = ids[b, : int(lengths[b])].astype(np.int64)
            wanted = int(max_tokens[b] if max_tokens.size > 1 else max_tokens[0])
            if len(prompt) == 0:
                raise ValueError("the prompt is empty")
            if len(prompt) > self.max_input_len:
                raise ValueError(f"prompt has {len(prompt)} tokens, more than max_input_len={self.max_input_len}")
            if not 1 <= wanted <= self.max_output_len:
                raise ValueError(f"max_tokens must be in 1..{self.max_output_len}, got {wanted}")
            end_id = -1 if min_tokens >= wanted else int(end_ids[b])
            rows.append(_Row(request, prompt, wanted, end_id, min_tokens, stop_words))
        return rows

    # ---------------------------------------------------------------- decoding
    def _generate(self, rows):
        width = max(len(r.prompt) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for b, r in enumerate(rows):
            ids[b, width - len(r.prompt):] = r.prompt
            mask[b, width - len(r.prompt):] = 1
        positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
        empty = np.zeros((len(rows), self.kv_heads, 0, self.head_dim), self.past_dtype)
        past = [empty] * len(self.past_names)
        active = list(range(len(rows)))
        for _ in range(max(r.max_tokens for r in rows)):
            logits, past = self._step(ids, mask, positions, past)
            last = logits[:, -1, :].astype(np.float64)
            chosen = last.argmax(axis=-1)
            top = last.max(axis=-1)
            logprob = last[np.arange(len(chosen)), chosen] - (top + np.log(np.exp(last - top[:, None]).sum(axis=-1)))
            keep = []
            for slot, b in enumerate(active):
                r = rows[b]
                token = int(chosen[slot])
                if token == r.end_id and len(r.tokens) >= r.min_tokens:
                    r.done = True
                else:
                    r.tokens.append(token)
                    r.logprobs.append(float(logprob[slot]))
                    cut = stop_index(r.tokens, r.stop_words, len(r.tokens) - max(map(len, r.stop_words), default=1))
                    if cut is not None:
                        del r.tokens[cut:], r.logprobs[cut:]
                        r.done = True
                    elif len(r.tokens) >= r.max_tokens:
                        r.done = True
                if not r.done:
                    keep.append(slot)
            if not keep:
                break
            if len(keep) < len(active):  # finished sequences leave the batch
                past = [p[keep] for p in past]
                mask, positions, chosen = mask[keep], positions[keep], chosen[keep]
                active = [active[slot] for slot in keep]
            ids = chosen.reshape(-1, 1).astype(np.int64)
            mask = np.concatenate([mask, np.ones((len(active), 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1

    def _step(self, ids, mask, positions, past):
        inputs = [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask),
                  pb_utils.Tensor("position_ids", np.ascontiguousarray(positions))]
        inputs += [pb_utils.Tensor(name, np.ascontiguousarray(p)) for name, p in zip(self.past_names, past)]
        response = pb_utils.InferenceRequest(
            model_name=self.step_model, inputs=inputs, requested_output_names=["logits", *self.present_names]
        ).exec()
        if response.has_error():
            raise RuntimeError(f"{self.step_model}: {response.error().message()}")
        logits = _numpy(pb_utils.get_output_tensor_by_name(response, "logits"))
        present = [_numpy(pb_utils.get_output_tensor_by_name(response, n)) for n in self.present_names]
        return logits, present

    # ---------------------------------------------------------------- responses out
    def _response(self, request, rows):
        exclude = bool(scalar(request, "exclude_input_in_output", self.exclude_input_default))
        want_logprobs = bool(scalar(request, "return_log_probs", False))
        seqs = [(r.tokens if exclude else [*r.prompt.tolist(), *r.tokens]) for r in rows]
        lps = [(r.logprobs if exclude else [0.0] * len(r.prompt) + r.logprobs) for r in rows]
        width = max(1, max(len(s) for s in seqs))
        n = len(rows)
        output_ids = np.full((n, 1, width), max(rows[0].end_id, 0), np.int32)
        output_lp = np.zeros((n, 1, width), np.float32)
        for b, (s, lp) in enumerate(zip(seqs, lps)):
            output_ids[b, 0, : len(s)] = s
            if want_logprobs:
                output_lp[b, 0, : len(lp)] = lp
        return pb_utils.InferenceResponse(
            output_tensors=[
                tensor("output_ids", output_ids),
                tensor("sequence_length", np.array([[len(s)] for s in seqs], np.int32)),
                tensor("cum_log_probs", np.array([[sum(r.logprobs)] for r in rows], np.float32)),
                tensor("output_log_probs", output_lp),
                tensor("context_logits", np.zeros((n, 1, 1), np.float32)),
                tensor("generation_logits", np.zeros((n, 1, 1, 1), np.float32)),
                tensor("batch_index", np.zeros((n, 1), np.int32)),
                tensor("sequence_index", np.zeros((n, 1), np.int32)),
            ]
        )


def _numpy(t):
    """BLS outputs of a GPU model may live in GPU memory."""
    if t.is_cpu():
        return t.as_numpy()
    import torch.utils.dlpack

    return torch.utils.dlpack.from_dlpack(t.to_dlpack()).cpu().numpy()


def _per_row(value, rows, default):
    if value is None or np.asarray(value).size == 0:
        return [default] * rows
    flat = np.asarray(value).reshape(-1)
    return [int(flat[b] if flat.size > 1 else flat[0]) for b in range(rows)]
