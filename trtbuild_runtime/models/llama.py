"""The Llama family on the paged KV pool, numerically the same as transformers' modelling code.

Q, K and V are one matmul, gate and up another. Normalisation and rotary embedding follow
transformers' own formulas (RMSNorm in float32, cos/sin from its `LlamaRotaryEmbedding`, which
knows every rope type), so greedy outputs match `generate` token for token in float32.
Qwen2 adds biases to Q/K/V, Qwen3 normalises Q and K per head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from trtbuild_runtime.attention import attend
from trtbuild_runtime.quantization import rms_norm, silu_mul


class RMSNorm(nn.Module):
    """One fused kernel on CUDA; `quantize_output` (FP8 layers) makes it emit e4m3 for the next GEMM."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.quantize_output = False

    def forward(self, x: torch.Tensor):
        return rms_norm(x, self.weight, self.eps, self.quantize_output)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, dim]; cos/sin [tokens, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, c: dict, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads") or self.heads
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv = nn.Linear(c["hidden_size"], self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o = nn.Linear(self.q_size, c["hidden_size"], bias=bool(c.get("attention_bias", False)))
        self.q_norm = RMSNorm(self.head_dim, c["rms_norm_eps"]) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, c["rms_norm_eps"]) if qk_norm else None
        self.scale = self.head_dim ** -0.5
        self.k_cache = self.v_cache = None  # views into the runner's pool
        self.k_scale = self.v_scale = 1.0  # FP8 KV pages hold K / k_scale and V / v_scale

    def forward(self, x, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(-1, self.heads, self.head_dim)
        k = k.view(-1, self.kv_heads, self.head_dim)
        v = v.view(-1, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = attend(q, k, v, self.k_cache, self.v_cache, self.scale, self.k_scale, self.v_scale)
        return self.o(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.inter = c["intermediate_size"]
        self.gate_up = nn.Linear(c["hidden_size"], 2 * self.inter, bias=False)
        self.down = nn.Linear(self.inter, c["hidden_size"], bias=False)
        self.quantize_activation = False

    def forward(self, x) -> torch.Tensor:
        return self.down(silu_mul(self.gate_up(x), self.quantize_activation))


class DecoderLayer(nn.Module):
    def __init__(self, c: dict, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.attn = Attention(c, qkv_bias, qk_norm)
        self.mlp = MLP(c)
        self.input_norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attn_norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attn_norm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        model_type = c["model_type"]
        qkv_bias = model_type == "qwen2" or bool(c.get("attention_bias", False))
        qk_norm = model_type == "qwen3"
        self.config = c
        self.vocab_size = c["vocab_size"]
        self.embed = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(c, qkv_bias, qk_norm) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.tied = bool(c.get("tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [tokens, hidden] of a flat step; attention reads the step's context."""
        cos, sin = self.cos[positions], self.sin[positions]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embed.weight if self.tied else self.lm_head.weight)

    def set_rope(self, hf_config, max_positions: int) -> None:
        """cos/sin for every position, by transformers' own RoPE functions (its rope utilities only: the
        modeling modules import generation code that needs scipy, which the numpy<2 serving environment
        cannot load)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope_type = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type == "default":
            base = hf_config.rope_parameters["rope_theta"]
            dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
            inv_freq, scaling = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype, device = self.embed.weight.dtype, self.embed.weight.device
        self.cos = (emb.cos() * scaling).to(dtype).to(device)
        self.sin = (emb.sin() * scaling).to(dtype).to(device)


# checkpoint name -> (our parameter, which slice of a merged matrix: (index, sizes attribute))
def _target(model: LlamaForCausalLM, name: str):
    """(parameter, slice index into the merged weight or None) for one checkpoint tensor."""
    parts = name.removeprefix("model.").split(".")
    if parts[0] == "embed_tokens":
        return model.embed.weight, None
    if parts[0] == "norm":
        return model.norm.weight, None
    if parts[0] == "lm_head":
        return (None, None) if model.tied else (model.lm_head.weight, None)
    if parts[0] != "layers":
        return None, None
    layer = model.layers[int(parts[1])]
    module, leaf, kind = parts[2], parts[3], parts[-1]
    if module == "self_attn":
        a = layer.attn
        if leaf in ("q_proj", "k_proj", "v_proj"):
            start = {"q_proj": 0, "k_proj": a.q_size, "v_proj": a.q_size + a.kv_size}[leaf]
            size = a.q_size if leaf == "q_proj" else a.kv_size
            return getattr(a.qkv, kind), slice(start, start + size)
        if leaf == "o_proj":
            return getattr(a.o, kind), None
        if leaf in ("q_norm", "k_norm"):
            return getattr(a, leaf).weight, None
    if module == "mlp":
        m = layer.mlp
        if leaf == "gate_proj":
            return m.gate_up.weight, slice(0, m.inter)
        if leaf == "up_proj":
            return m.gate_up.weight, slice(m.inter, 2 * m.inter)
        if leaf == "down_proj":
            return m.down.weight, None
    if module == "input_layernorm":
        return layer.input_norm.weight, None
    if module == "post_attention_layernorm":
        return layer.post_attn_norm.weight, None
    return None, None


SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".k_scale", ".v_scale")
INT4_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_scale", ".pre_quant_scale")
# merged module -> the checkpoint projections it holds, in row order
MERGED = {("attn", "qkv"): ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("attn", "o"): ("self_attn.o_proj",),
          ("mlp", "gate_up"): ("mlp.gate_proj", "mlp.up_proj"), ("mlp", "down"): ("mlp.down_proj",)}


class _Int4Slot(nn.Module):
    """Where an INT4 layer will go: holds only the bias, so the 16-bit weight is never allocated."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(torch.empty_like(linear.bias))


def _int4_layer(parts: list[dict], method: str, group: int, dtype: torch.dtype, device: torch.device, v2: bool, name: str):
    """One Int4Linear from the checkpoint tensors of the projections it merges (concatenated along N)."""
    from trtbuild_runtime import int4

    converted = []
    for t in parts:
        t = {k: v.to(device) for k, v in t.items()}
        if method == "int4_awq":
            if "weight_scale" not in t or t["weight"].dtype not in (torch.uint8, torch.int8):
                raise ValueError(f"{name}: a W4A16_AWQ layer needs a packed uint8 weight and weight_scale")
            qw, sc, pre = int4.from_modelopt(t["weight"], t["weight_scale"], group, dtype, t.get("pre_quant_scale"))
            converted.append((qw, sc, None, None, pre))
            group = qw.shape[0] * 8 // sc.shape[0]
        else:
            missing = {"qweight", "qzeros", "scales"} - set(t)
            if missing:
                raise ValueError(f"{name}: a GPTQ layer needs {', '.join(sorted(missing))}")
            qw, sc, zeros, perm = int4.from_gptq(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), group, dtype, v2)
            converted.append((qw, sc, zeros, perm, None))
            group = qw.shape[0] * 8 // sc.shape[0]
    perms, pres = [c[3] for c in converted], [c[4] for c in converted]
    for what, values in (("act-order permutation (g_idx)", perms), ("AWQ pre_quant_scale", pres)):
        first = values[0]
        if any((v is None) != (first is None) or (v is not None and not torch.equal(v, first)) for v in values[1:]):
            raise ValueError(f"{name}: the merged projections have different {what}s; the engine merges them into one GEMM")
    zeros = None
    if any(c[2] is not None for c in converted):
        zeros = torch.cat([c[2] if c[2] is not None else torch.full_like(c[1], 8) for c in converted], dim=1)
    return int4.Int4Linear(torch.cat([c[0] for c in converted], dim=1), torch.cat([c[1] for c in converted], dim=1), zeros,
                           group, perm=perms[0], pre_scale=pres[0])


def load_model(checkpoint: str | Path, dtype: torch.dtype, device: torch.device, max_positions: int,
               quantization: str = "none", fp8_gemm: str = "rowwise", block_size: int = 128) -> LlamaForCausalLM:
    """Build the network without allocating twice and fill it straight from the safetensors files.

    A ModelOpt FP8 checkpoint's e4m3 weights are dequantized into the merged 16-bit matrices and
    re-quantized onto the same grid by `quantize_fp8` (their per-tensor scales become per-channel
    ones); its calibrated KV scales (`k_proj.k_scale`, `v_proj.v_scale`) land on each layer's attention.
    An INT4 checkpoint (ModelOpt W4A16_AWQ, HF GPTQ) keeps its 4-bit codes: each merged projection
    becomes one `int4.Int4Linear`, and no 16-bit copy of those weights is ever made. `int4_wo`
    quantizes a 16-bit checkpoint at load (round-to-nearest, groups of `block_size`).
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    from trtbuild_runtime.int4 import Int4Linear, checkpoint_int4
    from trtbuild_runtime.quantization import quantize_fp8

    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    int4 = checkpoint_int4(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if int4:
        for layer in model.layers:
            for (owner, attr) in MERGED:
                module = getattr(layer, owner)
                setattr(module, attr, _Int4Slot(getattr(module, attr)))
    model = model.to_empty(device=device).to(dtype)
    expected = {id(p): n for n, p in model.named_parameters()}
    filled: set[int] = set()
    files = sorted(checkpoint.glob("*.safetensors"))
    scales: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict[str, torch.Tensor]] = {}  # INT4: projection prefix -> its tensors
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            scales.update({name: f.get_tensor(name) for name in f.keys() if name.endswith(SCALE_SUFFIXES) and not int4})
    channel_scales: dict[int, torch.Tensor] = {}  # id(16-bit weight) -> per-row scale of its e4m3 source
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if int4 and ".layers." in name and any(f".{p}." in name for ps in MERGED.values() for p in ps):
                        prefix, leaf = name.rsplit(".", 1)
                        if leaf != "bias":
                            quantized.setdefault(prefix, {})[leaf] = f.get_tensor(name)
                            continue
                    if name.endswith(SCALE_SUFFIXES):
                        if int4 and name.endswith((".k_scale", ".v_scale")):
                            scales[name] = f.get_tensor(name)
                        continue
                    param, part = _target(model, name)
                    if param is None:
                        continue
                    tensor = f.get_tensor(name)
                    target = param if part is None else param[part]
                    if target.shape != tensor.shape:
                        raise ValueError(f"{file.name}: {name} has shape {tuple(tensor.shape)}, the config says {tuple(target.shape)}")
                    if tensor.dtype == torch.float8_e4m3fn:
                        scale = scales.get(name.removesuffix("weight") + "weight_scale")
                        if scale is None:
                            raise ValueError(f"{file.name}: {name} is float8_e4m3fn but has no weight_scale")
                        tensor = tensor.float() * scale.float()
                        rows = channel_scales.setdefault(id(param), torch.ones(param.shape[0]))
                        rows[part if part is not None else slice(None)] = scale.float().expand(tensor.shape[0])
                    target.copy_(tensor)
                    filled.add(id(param))
        if int4:
            method, group, details = int4
            for i, layer in enumerate(model.layers):
                for (owner, attr), projections in MERGED.items():
                    module = getattr(layer, owner)
                    slot = getattr(module, attr)
                    names = [f"model.layers.{i}.{p}" for p in projections]
                    absent = [n for n in names if n not in quantized]
                    if absent:
                        raise ValueError(f"{checkpoint}: {absent[0]} is not quantized in this {method} checkpoint "
                                         "(the engine runs every decoder projection in INT4)")
                    layer4 = _int4_layer([quantized.pop(n) for n in names], method, group, dtype, device,
                                         details.get("v2", False), names[0])
                    layer4.bias = slot.bias
                    setattr(module, attr, layer4)
    missing = [n for i, n in expected.items() if i not in filled]
    if missing:
        raise ValueError(f"{checkpoint}: the safetensors files lack {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}.self_attn."
        layer.attn.k_scale = float(scales.get(prefix + "k_proj.k_scale", torch.tensor(1.0)))
        layer.attn.v_scale = float(scales.get(prefix + "v_proj.v_scale", torch.tensor(1.0)))
    model.set_rope(AutoConfig.from_pretrained(checkpoint), max_positions)
    if channel_scales and quantization != "fp8":
        raise ValueError(f"{checkpoint} holds FP8 weights: run it with quantization fp8")
    if quantization == "fp8":
        quantize_fp8(model, {i: s.to(device) for i, s in channel_scales.items()}, fp8_gemm)
    if quantization == "int4_wo" and not int4:
        with torch.no_grad():
            for layer in model.layers:
                for (owner, attr) in MERGED:
                    module = getattr(layer, owner)
                    linear = getattr(module, attr)
                    setattr(module, attr, Int4Linear.from_weight(linear.weight.detach(), block_size, linear.bias))
                    del linear
    return model.eval()
