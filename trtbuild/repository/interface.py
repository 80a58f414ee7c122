"""Tensor interfaces of the generated models, kept compatible with NVIDIA's TensorRT-LLM repository.

A client written for NVIDIA's `ensemble` (text_input, max_tokens, stream, ...) works against ours,
and our `llm` step speaks the tensor interface of NVIDIA's C++ `tensorrt_llm` model, so the same
preprocessing, postprocessing and ensembles serve every runtime.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton config name, e.g. TYPE_INT32
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None

    @property
    def dims_text(self) -> str:
        return ", ".join(str(d) for d in self.dims)

    @property
    def reshape_text(self) -> str | None:
        return None if self.reshape is None else ", ".join(str(d) for d in self.reshape)


def _t(name: str, dtype: str, dims: tuple[int, ...] = (1,), optional: bool = True, reshape=None) -> Tensor:
    return Tensor(name, f"TYPE_{dtype}", dims, optional, reshape)


# --- ensemble and BLS entry points (what clients see) -------------------------------------------------------
ENSEMBLE_INPUTS: tuple[Tensor, ...] = (
    _t("text_input", "STRING", (1,), optional=False),
    # required, but declared optional: Triton 2.51 answers a decoupled ensemble's missing required
    # input with an empty stream (HTTP 200), so the LLM step refuses it instead, with its name
    _t("max_tokens", "INT32", (1,)),
    _t("bad_words", "STRING", (-1,)),
    _t("stop_words", "STRING", (-1,)),
    _t("end_id", "INT32"),
    _t("pad_id", "INT32"),
    _t("top_k", "INT32"),
    _t("top_p", "FP32"),
    _t("temperature", "FP32"),
    _t("length_penalty", "FP32"),
    _t("repetition_penalty", "FP32"),
    _t("min_tokens", "INT32"),
    _t("presence_penalty", "FP32"),
    _t("frequency_penalty", "FP32"),
    _t("seed", "UINT64"),
    _t("return_log_probs", "BOOL"),
    _t("return_context_logits", "BOOL"),
    _t("return_generation_logits", "BOOL"),
    _t("beam_width", "INT32"),
    _t("stream", "BOOL"),
    _t("exclude_input_in_output", "BOOL"),
    _t("num_return_sequences", "INT32"),
)

ENSEMBLE_OUTPUTS: tuple[Tensor, ...] = (
    _t("text_output", "STRING", (-1,), optional=False),
    _t("cum_log_probs", "FP32", (-1,), optional=False),
    _t("output_log_probs", "FP32", (-1, -1), optional=False),
    _t("context_logits", "FP32", (-1, -1), optional=False),
    _t("generation_logits", "FP32", (-1, -1, -1), optional=False),
    _t("batch_index", "INT32", (1,), optional=False),
    _t("sequence_index", "INT32", (1,), optional=False),
)

# --- the LLM step: NVIDIA's tensorrt_llm model interface ---------------------------------------
LLM_INPUTS: tuple[Tensor, ...] = (
    _t("input_ids", "INT32", (-1,), optional=False),
    _t("input_lengths", "INT32", (1,), optional=False, reshape=()),
    _t("request_output_len", "INT32", (1,), optional=False, reshape=()),
    _t("end_id", "INT32", reshape=()),
    _t("pad_id", "INT32", reshape=()),
    _t("stop_words_list", "INT32", (2, -1)),
    _t("bad_words_list", "INT32", (2, -1)),
    _t("beam_width", "INT32", reshape=()),
    _t("temperature", "FP32", reshape=()),
    _t("runtime_top_k", "INT32", reshape=()),
    _t("runtime_top_p", "FP32", reshape=()),
    _t("len_penalty", "FP32", reshape=()),
    _t("repetition_penalty", "FP32", reshape=()),
    _t("min_tokens", "INT32", reshape=()),
    _t("presence_penalty", "FP32", reshape=()),
    _t("frequency_penalty", "FP32", reshape=()),
    _t("seed", "UINT64", reshape=()),
    _t("return_log_probs", "BOOL", reshape=()),
    _t("return_context_logits", "BOOL", reshape=()),
    _t("return_generation_logits", "BOOL", reshape=()),
    _t("exclude_input_in_output", "BOOL", reshape=()),
    _t("stop", "BOOL", reshape=()),
    _t("streaming", "BOOL", reshape=()),
    _t("num_return_sequences", "INT32", reshape=()),
)

LLM_OUTPUTS: tuple[Tensor, ...] = (
    _t("output_ids", "INT32", (-1, -1), optional=False),
    _t("sequence_length", "INT32", (-1,), optional=False),
    *ENSEMBLE_OUTPUTS[1:],  # the ensemble's outputs but text_output: log-probs, logits, indices
)

# --- the transformers runtime's LLM step also answers text, as Triton's vLLM model does ---------
# (one model, one hop for streaming clients): either input_ids + input_lengths or text_input, and
# the ensemble's names where they differ from the LLM's (max_tokens, stream, top_k, top_p, words).
TEXT_INPUTS: tuple[Tensor, ...] = (
    _t("text_input", "STRING", (1,)),
    _t("max_tokens", "INT32", reshape=()),
    _t("stream", "BOOL", reshape=()),
    _t("top_k", "INT32", reshape=()),
    _t("top_p", "FP32", reshape=()),
    _t("stop_words", "STRING", (-1,)),
    _t("bad_words", "STRING", (-1,)),
)
# What Triton's OpenAI-compatible frontend sends (always, so they must be declared) and reads for
# `usage`; NVIDIA's perf metrics, those the engine can fill (a client asking for another output gets
# Triton's error naming it).
USAGE_INPUTS: tuple[Tensor, ...] = (
    _t("return_num_input_tokens", "BOOL", reshape=()),
    _t("return_num_output_tokens", "BOOL", reshape=()),
    _t("return_perf_metrics", "BOOL", reshape=()),
)
USAGE_OUTPUTS: tuple[Tensor, ...] = (
    _t("num_input_tokens", "INT32", optional=False),
    _t("num_output_tokens", "INT32", optional=False),  # this response's tokens: the frontend adds them up
    _t("arrival_time_ns", "INT64", optional=False),
    _t("first_scheduled_time_ns", "INT64", optional=False),
    _t("first_token_time_ns", "INT64", optional=False),
    _t("last_token_time_ns", "INT64", optional=False),
    _t("kv_cache_reused_blocks", "INT32", optional=False),
)
TEXT_LLM_INPUTS: tuple[Tensor, ...] = tuple(
    dataclasses.replace(t, optional=True) if t.name in ("input_ids", "input_lengths", "request_output_len") else t
    for t in LLM_INPUTS
) + TEXT_INPUTS + USAGE_INPUTS
TEXT_LLM_OUTPUTS: tuple[Tensor, ...] = (_t("text_output", "STRING", (-1,), optional=False),) + LLM_OUTPUTS + USAGE_OUTPUTS

# NVIDIA's ensemble interface on the text model: one step, routed by Triton's core (no Python in
# between); the ensemble's names map onto the text model's, which takes them as they are but one.
# text_input too is declared optional here and refused by name by the text model when missing, for
# the reason max_tokens is (Triton 2.51 answers a decoupled ensemble's missing required input with
# an empty stream over gRPC and an HTTP 200 carrying an error).
TEXT_ENSEMBLE_INPUTS: tuple[Tensor, ...] = tuple(
    dataclasses.replace(t, optional=True) if t.name == "text_input" else t for t in ENSEMBLE_INPUTS
) + tuple(dataclasses.replace(t, reshape=None) for t in USAGE_INPUTS)
TEXT_ENSEMBLE_OUTPUTS: tuple[Tensor, ...] = ENSEMBLE_OUTPUTS + USAGE_OUTPUTS
ENSEMBLE_TO_TEXT_LLM: dict[str, str] = {"length_penalty": "len_penalty"}


def text_ensemble_step(llm: str) -> "Step":
    """The whole ensemble: every ensemble input to the text model's input, every output back."""
    return Step(llm,
                input_map=tuple((ENSEMBLE_TO_TEXT_LLM.get(t.name, t.name), t.name) for t in TEXT_ENSEMBLE_INPUTS),
                output_map=tuple((t.name, t.name) for t in TEXT_ENSEMBLE_OUTPUTS))

# --- pre/post-processing -----------------------------------------------------------------------
PREPROCESSING_INPUTS: tuple[Tensor, ...] = (
    _t("QUERY", "STRING", (1,), optional=False),
    _t("REQUEST_OUTPUT_LEN", "INT32", (1,)),  # required by the ensemble; missing: trtbuild_utils.MISSING_OUTPUT_LEN
    _t("BAD_WORDS_DICT", "STRING", (-1,)),
    _t("STOP_WORDS_DICT", "STRING", (-1,)),
    _t("END_ID", "INT32"),
    _t("PAD_ID", "INT32"),
)
PREPROCESSING_OUTPUTS: tuple[Tensor, ...] = (
    _t("INPUT_ID", "INT32", (-1,), optional=False),
    _t("REQUEST_INPUT_LEN", "INT32", (1,), optional=False),
    _t("BAD_WORDS_IDS", "INT32", (2, -1), optional=False),
    _t("STOP_WORDS_IDS", "INT32", (2, -1), optional=False),
    _t("REQUEST_OUTPUT_LEN", "INT32", (1,), optional=False),
    _t("OUT_END_ID", "INT32", (1,), optional=False),
    _t("OUT_PAD_ID", "INT32", (1,), optional=False),
)
POSTPROCESSING_INPUTS: tuple[Tensor, ...] = (
    _t("TOKENS_BATCH", "INT32", (-1, -1), optional=False),
    _t("SEQUENCE_LENGTH", "INT32", (-1,), optional=False),
)
POSTPROCESSING_OUTPUTS: tuple[Tensor, ...] = (_t("OUTPUT", "STRING", (-1,), optional=False),)


@dataclasses.dataclass(frozen=True)
class Step:
    model: str
    input_map: tuple[tuple[str, str], ...]  # (step tensor, ensemble tensor)
    output_map: tuple[tuple[str, str], ...]


# (ensemble input -> llm input) for values that need no tokenizer
DIRECT_TO_LLM: tuple[tuple[str, str], ...] = (
    ("beam_width", "beam_width"),
    ("temperature", "temperature"),
    ("runtime_top_k", "top_k"),
    ("runtime_top_p", "top_p"),
    ("len_penalty", "length_penalty"),
    ("repetition_penalty", "repetition_penalty"),
    ("min_tokens", "min_tokens"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("seed", "seed"),
    ("return_log_probs", "return_log_probs"),
    ("return_context_logits", "return_context_logits"),
    ("return_generation_logits", "return_generation_logits"),
    ("exclude_input_in_output", "exclude_input_in_output"),
    ("streaming", "stream"),
    ("num_return_sequences", "num_return_sequences"),
)


def ensemble_steps(preprocessing: str, llm: str, postprocessing: str) -> tuple[Step, ...]:
    """The ensemble graph: tokenize, generate, detokenize."""
    return (
        Step(
            preprocessing,
            input_map=(
                ("QUERY", "text_input"),
                ("REQUEST_OUTPUT_LEN", "max_tokens"),
                ("BAD_WORDS_DICT", "bad_words"),
                ("STOP_WORDS_DICT", "stop_words"),
                ("END_ID", "end_id"),
                ("PAD_ID", "pad_id"),
            ),
            output_map=(
                ("INPUT_ID", "_INPUT_ID"),
                ("REQUEST_INPUT_LEN", "_REQUEST_INPUT_LEN"),
                ("BAD_WORDS_IDS", "_BAD_WORDS_IDS"),
                ("STOP_WORDS_IDS", "_STOP_WORDS_IDS"),
                ("REQUEST_OUTPUT_LEN", "_REQUEST_OUTPUT_LEN"),
                ("OUT_END_ID", "_END_ID"),
                ("OUT_PAD_ID", "_PAD_ID"),
            ),
        ),
        Step(
            llm,
            input_map=(
                ("input_ids", "_INPUT_ID"),
                ("input_lengths", "_REQUEST_INPUT_LEN"),
                ("request_output_len", "_REQUEST_OUTPUT_LEN"),
                ("end_id", "_END_ID"),
                ("pad_id", "_PAD_ID"),
                ("stop_words_list", "_STOP_WORDS_IDS"),
                ("bad_words_list", "_BAD_WORDS_IDS"),
                *DIRECT_TO_LLM,
            ),
            output_map=(
                ("output_ids", "_TOKENS_BATCH"),
                ("sequence_length", "_SEQUENCE_LENGTH"),
                ("cum_log_probs", "cum_log_probs"),
                ("output_log_probs", "output_log_probs"),
                ("context_logits", "context_logits"),
                ("generation_logits", "generation_logits"),
                ("batch_index", "batch_index"),
                ("sequence_index", "sequence_index"),
            ),
        ),
        Step(
            postprocessing,
            input_map=(("TOKENS_BATCH", "_TOKENS_BATCH"), ("SEQUENCE_LENGTH", "_SEQUENCE_LENGTH")),
            output_map=(("OUTPUT", "text_output"),),
        ),
    )
