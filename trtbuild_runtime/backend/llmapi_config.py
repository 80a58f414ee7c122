"""Pure helpers of the LLM-API model: model.yaml, config agreement, request -> SamplingParams.

Nothing here imports Triton or TensorRT-LLM, so trtbuild's tests exercise it directly.
"""

import math
from pathlib import Path

import yaml

PREFIX = "sampling_param_"
# Triton input -> (SamplingParams keyword, conversion)
SAMPLING_INPUTS = {
    "sampling_param_best_of": ("best_of", int),
    "sampling_param_temperature": ("temperature", float),
    "sampling_param_top_k": ("top_k", int),
    "sampling_param_top_p": ("top_p", float),
    "sampling_param_frequency_penalty": ("frequency_penalty", float),
    "sampling_param_presence_penalty": ("presence_penalty", float),
    "sampling_param_repetition_penalty": ("repetition_penalty", float),
    "sampling_param_min_tokens": ("min_tokens", int),
    "sampling_param_max_tokens": ("max_tokens", int),
    "sampling_param_seed": ("seed", int),
    "sampling_param_stop": ("stop", list),
}
TRITON_CONFIG_KEYS = ("max_batch_size", "decoupled")


# Variables mpirun sets for one job. When tritonserver runs under mpirun, the LLM API must not
# mistake itself for a rank of that job: without them mpi4py starts as a singleton and spawns its
# own tensor-parallel workers. MCA settings (OMPI_MCA_*, PMIX_MCA_*) are configuration and stay.
MPI_JOB_PREFIXES = ("OMPI_COMM_WORLD_", "OMPI_UNIVERSE_SIZE", "OMPI_FIRST_RANKS", "OMPI_APP_CTX_NUM_PROCS",
                    "OMPI_MCA_orte_", "ORTE_", "PMI_")


def clear_mpi_job_environment(environ):
    """Remove the launching MPI job's identity from `environ` (os.environ); returns the names removed."""
    removed = [k for k in environ if k.startswith(MPI_JOB_PREFIXES) or (k.startswith("PMIX_") and not k.startswith("PMIX_MCA_"))]
    for key in removed:
        del environ[key]
    return sorted(removed)


def load_model_yaml(path):
    """(LLM keyword arguments, triton_config) from model.yaml."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of LLM(...) arguments")
    data = dict(data)
    triton_config = data.pop("triton_config", None) or {}
    if not data.get("model"):
        raise ValueError(f"{path}: 'model' (the checkpoint path) is missing")
    return data, triton_config


def check_triton_config(model_config, triton_config):
    """config.pbtxt (as Triton parsed it) and model.yaml's triton_config must say the same."""
    got = {
        "max_batch_size": int(model_config.get("max_batch_size", 0)),
        "decoupled": bool((model_config.get("model_transaction_policy") or {}).get("decoupled", False)),
    }
    wrong = [f"{k}: config.pbtxt {got[k]!r}, model.yaml {triton_config[k]!r}"
             for k in TRITON_CONFIG_KEYS if k in triton_config and triton_config[k] != got[k]]
    if wrong:
        raise ValueError("config.pbtxt and model.yaml triton_config disagree (" + "; ".join(wrong) + "): regenerate the repository")
    if not got["decoupled"]:
        raise ValueError("the LLM-API model must be decoupled (model_transaction_policy { decoupled: true })")


def sampling_kwargs(values, max_input_tokens=None):
    """SamplingParams keywords from the request's sampling_param_* values (None: not sent)."""
    kwargs = {}
    for name, value in values.items():
        if value is None or name not in SAMPLING_INPUTS:
            continue
        key, convert = SAMPLING_INPUTS[name]
        kwargs[key] = [str(v) for v in value] if convert is list else convert(value)
    if "stop" in kwargs:
        kwargs["stop"] = [s for s in kwargs["stop"] if s]
        if not kwargs["stop"]:
            del kwargs["stop"]
    if kwargs.get("max_tokens", 1) < 1:
        raise ValueError(f"sampling_param_max_tokens must be >= 1, got {kwargs['max_tokens']}")
    temperature = kwargs.get("temperature")
    if temperature is not None and (temperature < 0 or not math.isfinite(temperature)):
        raise ValueError(f"sampling_param_temperature must be >= 0, got {temperature}")
    if temperature == 0:  # greedy: TensorRT-LLM expresses it as top_k 1
        del kwargs["temperature"]
        kwargs["top_k"] = 1
    top_p = kwargs.get("top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"sampling_param_top_p must be in (0, 1], got {top_p}")
    if kwargs.get("top_k", 0) < 0:
        raise ValueError(f"sampling_param_top_k must be >= 0, got {kwargs['top_k']}")
    if kwargs.get("min_tokens", 0) > kwargs.get("max_tokens", math.inf):
        raise ValueError("sampling_param_min_tokens must not exceed sampling_param_max_tokens")
    if kwargs.get("best_of", 1) < 1:
        raise ValueError(f"sampling_param_best_of must be >= 1, got {kwargs['best_of']}")
    return kwargs


def check_prompt_length(n_tokens, max_input_len):
    if n_tokens > max_input_len:
        raise ValueError(f"the prompt has {n_tokens} tokens; this deployment accepts at most {max_input_len} (max_input_len)")
    if n_tokens == 0:
        raise ValueError("text_input is empty")
