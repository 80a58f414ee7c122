"""Tensors in, tokens out: the KV pool, a step's inputs, CUDA graphs for decode, and sampling.

The pool is sized once, at start: on CUDA from the memory left free after the weights and a
warm-up prefill at the full token budget (times `kv_cache_free_gpu_mem_fraction`); on CPU for `max_batch_size`
full-length sequences, refused with the numbers if that exceeds the machine's available RAM.

Decode steps replay CUDA graphs captured at bucketed row counts (1, 2, 4, 8, 16, 32, 48, ...), up
to max(max_batch_size, 128): a row is a sequence's next token, or a draft token, or a token of a
prompt step short enough to fit (a prompt after a prefix-cache hit, a short prompt); those run as
decode rows with their own context lengths instead of an eager prefill, whose launches alone cost
milliseconds. The step's inputs are copied into static buffers, padded rows write their K/V into the scratch
block and read nothing. The host waits for the device once per step, for the sampled tokens.
"""

from __future__ import annotations

import bisect
import logging

import numpy as np
import torch

from trtbuild_runtime import attention
from trtbuild_runtime.config import EngineConfig, checkpoint_quantization, resolve_device
from trtbuild_runtime.memory import OutOfMemory, check_cpu_pool, kv_block_bytes
from trtbuild_runtime.models import load_model
from trtbuild_runtime.sampler import SamplingTensors, sample
from trtbuild_runtime.scheduler import Batch

log = logging.getLogger("trtbuild_runtime")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, hf_config: dict, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
        if device.type == "cpu" and dtype in ("float16", "bfloat16"):
            dtype = "float32"  # half precision matmuls are slow on most CPUs
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or auto, got {dtype}")
    return DTYPES[dtype]


def _fp8_capable(device: torch.device) -> bool:
    """FP8 GEMMs need compute capability 8.9 (Ada, Hopper) or later; torch runs them on CPU too."""
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))


def resolve_quantization(requested: str, hf_config: dict, device: torch.device) -> str:
    """The checkpoint's own quantization wins over "none"; FP8 is refused where it cannot run."""
    stored = checkpoint_quantization(hf_config)
    quantization = stored if requested == "none" else requested
    if stored != "none" and quantization != stored:
        raise ValueError(f"the checkpoint is quantized {stored}; it cannot run as {quantization}")
    if quantization in ("int4_awq", "int4_gptq") and stored == "none":
        raise ValueError(f"{quantization} runs a pre-quantized checkpoint (trtbuild quantize --precision {quantization} --format hf); "
                         "int4_wo quantizes a 16-bit one at load")
    if quantization == "fp8" and not _fp8_capable(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"FP8 needs compute capability 8.9 or later; {torch.cuda.get_device_name(device)} is {major}.{minor}")
    return quantization


def resolve_kv_dtype(requested: str, hf_config: dict, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """auto: e4m3 when the checkpoint carries calibrated FP8 KV scales, else the model dtype."""
    q = hf_config.get("quantization_config") or {}
    fp8 = requested == "fp8" or (requested == "auto" and (q.get("kv_cache_scheme") or {}).get("type") == "float")
    if fp8 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("an FP8 KV cache needs compute capability 8.9 or later")
    return torch.float8_e4m3fn if fp8 else dtype


MIN_GRAPH_ROWS = 128  # a small engine still replays a graph for a 128-token prompt step


def capture_sizes(max_batch_size: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch_size + 1, 16 if max_batch_size <= 128 else 32))
    return sorted({s for s in sizes if s < max_batch_size} | {max_batch_size})


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config: dict):
        self.config = config
        self.device = torch.device(resolve_device(config.device))
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        torch.manual_seed(config.seed)
        self.quantization = resolve_quantization(config.quantization, hf_config, self.device)
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, hf_config, self.dtype, self.device)
        self.model = load_model(config.model, self.dtype, self.device, config.max_seq_len, self.quantization, config.fp8_gemm,
                                config.block_size)
        self.vocab_size = self.model.vocab_size
        first = self.model.layers[0].attn
        self.kv_heads, self.head_dim, self.num_layers = first.kv_heads, first.head_dim, len(self.model.layers)
        self.page = config.kv_cache_page_size
        self.num_blocks = self._size_pool()
        shape = (self.num_layers, 2, self.num_blocks + 1, self.page, self.kv_heads, self.head_dim)
        self.kv = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.attn.k_cache, layer.attn.v_cache = self.kv[i, 0], self.kv[i, 1]
        self.trash_slot = self.num_blocks * self.page
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # rows a step may hold: a sequence each, plus draft tokens and short prompts, which run as rows too
        self.max_rows = max(config.max_batch_size, MIN_GRAPH_ROWS)
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture()

    # ------------------------------------------------------------------ memory
    @property
    def block_bytes(self) -> int:
        return kv_block_bytes(self.num_layers, self.page, self.kv_heads, self.head_dim, self.kv_dtype.itemsize)

    def _size_pool(self) -> int:
        c = self.config
        wanted = c.kv_cache_num_blocks
        if self.device.type == "cuda":
            self._warm_up()
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * c.kv_cache_free_gpu_mem_fraction)
            fits = budget // self.block_bytes
            if wanted is None:
                wanted = fits
            where = f"{free / 2**30:.1f} GiB free on {torch.cuda.get_device_name(self.device)} x {c.kv_cache_free_gpu_mem_fraction}"
        else:
            if wanted is None:
                wanted = c.max_batch_size * c.max_blocks_per_seq
            try:
                fits = check_cpu_pool(wanted, self.block_bytes, self.page)
            except OutOfMemory as e:
                raise OutOfMemory(f"{e}: lower max_batch_size or max_input_len + max_output_len") from None
            where = "RAM"
        if wanted > fits:
            raise OutOfMemory(f"the KV cache needs {wanted} blocks of {self.page} tokens ({wanted * self.block_bytes / 2**30:.2f} GiB) "
                              f"but {where} holds {fits}: lower max_batch_size or max_input_len + max_output_len")
        if wanted < c.max_blocks_per_seq:
            raise OutOfMemory(f"the KV cache holds {wanted} blocks of {self.page} tokens, fewer than one sequence of "
                              f"max_seq_len {c.max_seq_len} needs ({c.max_blocks_per_seq})")
        log.info("KV cache: %d blocks x %d tokens (%.2f GiB, %s)", wanted, self.page, wanted * self.block_bytes / 2**30, where)
        return wanted

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """One prefill at the full token budget, so the pool leaves room for its activations."""
        tokens = min(self.config.max_num_tokens, self.config.max_seq_len * self.config.max_batch_size)
        length = min(tokens, self.config.max_seq_len)
        seqs = max(1, tokens // length)
        ids = torch.zeros(seqs * length, dtype=torch.long, device=self.device)
        positions = torch.arange(length, device=self.device).repeat(seqs)
        scratch = torch.zeros(2, 1, self.page, self.kv_heads, self.head_dim, dtype=self.kv_dtype, device=self.device)
        for layer in self.model.layers:
            layer.attn.k_cache, layer.attn.v_cache = scratch[0], scratch[1]
        attention.set_context(attention.StepContext(True, torch.zeros_like(ids), fresh=True, num_seqs=seqs, max_query_len=length))
        hidden = self.model(ids, positions)
        self.model.logits(hidden[-seqs:])
        attention.set_context(None)
        del hidden, scratch
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    # ------------------------------------------------------------------ steps
    def _tensor(self, values, dtype) -> torch.Tensor:
        return torch.as_tensor(values, dtype=dtype).to(self.device)

    def _block_tables(self, seqs, rows: int | None = None) -> np.ndarray:
        tables = [s.block_table for s in seqs]
        width = max(map(len, tables))
        table = np.zeros((rows or len(seqs), width), dtype=np.int32)
        if all(len(t) == width for t in tables):  # the common decode step: one conversion, not one per row
            table[: len(tables)] = tables
            return table
        for i, t in enumerate(tables):
            table[i, : len(t)] = t
        return table

    def _slots(self, seq, start: int, end: int) -> list[int]:
        page, table = self.page, seq.block_table
        return [table[p // page] * page + p % page for p in range(start, end)]

    def _prepare_prefill(self, batch: Batch):
        ids, positions, slots, pad_index, sample_rows = [], [], [], [], []
        lengths = batch.num_tokens
        longest = max(lengths)
        fresh = all(s.num_computed == 0 for s in batch.seqs)
        for i, (seq, n) in enumerate(zip(batch.seqs, lengths)):
            start = seq.num_computed
            ids.extend(seq.tokens[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slots(seq, start, start + n))
            pad_index.extend(range(i * longest, i * longest + n))
            if batch.samples(i):
                sample_rows.append(len(ids) - 1)
        needs_pad = any(n != longest for n in lengths)
        ctx = attention.StepContext(
            is_prefill=True, slot_mapping=self._tensor(slots, torch.long), fresh=fresh, num_seqs=len(lengths),
            max_query_len=longest, pad_index=self._tensor(pad_index, torch.long) if needs_pad else None)
        if not fresh:
            tables = self._block_tables(batch.seqs)
            if self.device.type == "cuda":
                ctx.token_tables = self._tensor(np.repeat(tables, lengths, axis=0), torch.int32)
                ctx.token_lens = self._tensor(np.array(positions, dtype=np.int32) + 1, torch.int32)
            else:
                ctx.block_tables = self._tensor(tables, torch.int32)
                ctx.context_lens = self._tensor([s.num_computed + n for s, n in zip(batch.seqs, lengths)], torch.int32)
                ctx.query_starts = self._tensor([s.num_computed for s in batch.seqs], torch.long)
        return self._tensor(ids, torch.long), self._tensor(positions, torch.long), ctx, sample_rows

    @staticmethod
    def _row_entries(batch: Batch) -> list[tuple]:
        """(sequence, first position, tokens) of each sequence's rows in a row-shaped step."""
        if batch.is_prefill:
            return [(s, s.num_computed, s.tokens[s.num_computed:s.num_computed + n]) for s, n in zip(batch.seqs, batch.num_tokens)]
        return [(s, len(s.tokens) - 1, [s.tokens[-1], *d]) for s, d in zip(batch.seqs, batch.drafts)]

    def _prepare_rows(self, batch: Batch, rows: int):
        """The decode step's inputs: one row per sequence at its last token, or, for drafts and short
        prompts, one row per token, each at its own position and context length, reading its
        sequence's blocks (causal by construction)."""
        ids = np.zeros(rows, dtype=np.int64)
        positions = np.zeros(rows, dtype=np.int64)
        slots = np.full(rows, self.trash_slot, dtype=np.int64)
        lens = np.zeros(rows, dtype=np.int32)
        page = self.page
        if not batch.is_prefill and not batch.drafts:
            seqs = batch.seqs
            n = len(seqs)
            tokens = [s.tokens for s in seqs]
            last = np.fromiter(map(len, tokens), dtype=np.int64, count=n) - 1
            ids[:n] = [t[-1] for t in tokens]
            positions[:n] = last
            lens[:n] = last + 1
            tables = self._block_tables(seqs, rows)
            slots[:n] = tables[np.arange(n), last // page].astype(np.int64) * page + last % page
            return ids, positions, slots, lens, tables
        owners = []
        r = 0
        for s, start, tokens in self._row_entries(batch):
            for j, token in enumerate(tokens):
                p = start + j
                ids[r], positions[r], lens[r] = token, p, p + 1
                slots[r] = s.block_table[p // page] * page + p % page
                owners.append(s)
                r += 1
        return ids, positions, slots, lens, self._block_tables(owners, rows)

    def _fits_graph(self, batch: Batch) -> bool:
        """A prompt step small enough for a captured graph runs as decode rows: no eager launches."""
        return bool(self.graphs) and batch.is_prefill and batch.total_tokens <= self.graph_sizes[-1]

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[list[int], list[float] | None]:
        """Run one step; tokens (and log-probs) for the sequences that sample, in batch order (for a
        decode step with drafts, one per row: a sequence's last token, then each draft token)."""
        sampling_seqs = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        if batch.drafts:
            sampling_seqs = [s for s, d in zip(batch.seqs, batch.drafts) for _ in range(len(d) + 1)]
        if self._fits_graph(batch):
            ends = np.cumsum(batch.num_tokens) - 1
            logits = self._rows(batch, batch.total_tokens)[self._tensor([ends[i] for i in range(len(batch.seqs)) if batch.samples(i)], torch.long)]
        elif batch.is_prefill:
            ids, positions, ctx, rows = self._prepare_prefill(batch)
            attention.set_context(ctx)
            hidden = self.model(ids, positions)
            logits = self.model.logits(hidden[self._tensor(rows, torch.long)]) if rows else None
        else:
            logits = self._rows(batch, batch.num_rows)
        attention.set_context(None)
        if not sampling_seqs:
            return [], None
        tokens, logprobs = sample(logits, SamplingTensors.build(sampling_seqs, self.vocab_size, self.device), sampling_seqs)
        if logprobs is None:
            return tokens.tolist(), None
        both = torch.stack((tokens.double(), logprobs.double())).tolist()  # one transfer for both
        return [int(t) for t in both[0]], both[1]

    def _rows(self, batch: Batch, n: int) -> torch.Tensor:
        """Logits of every row: a captured graph at the next bucket up, else eager."""
        size = self.graph_sizes[bisect.bisect_left(self.graph_sizes, n)] if self.graphs and n <= self.graph_sizes[-1] else None
        ids, positions, slots, lens, tables = self._prepare_rows(batch, size or n)
        if size is None:
            ctx = attention.StepContext(False, self._tensor(slots, torch.long), context_lens=self._tensor(lens, torch.int32),
                                        block_tables=self._tensor(tables, torch.int32))
            attention.set_context(ctx)
            return self.model.logits(self.model(self._tensor(ids, torch.long), self._tensor(positions, torch.long)))
        b = self.buffers
        width = tables.shape[1]
        b["ids"][:size].copy_(torch.from_numpy(ids), non_blocking=True)
        b["positions"][:size].copy_(torch.from_numpy(positions), non_blocking=True)
        b["slots"][:size].copy_(torch.from_numpy(slots), non_blocking=True)
        b["lens"][:size].copy_(torch.from_numpy(lens), non_blocking=True)
        b["tables"][:size, :width].copy_(torch.from_numpy(tables), non_blocking=True)
        self.graphs[size].replay()
        return b["logits"][:n]

    # ------------------------------------------------------------------ CUDA graphs
    @torch.inference_mode()
    def _capture(self) -> None:
        c = self.config
        self.graph_sizes = capture_sizes(self.max_rows)
        top = self.graph_sizes[-1]
        d = self.device
        b = self.buffers = {
            "ids": torch.zeros(top, dtype=torch.long, device=d),
            "positions": torch.zeros(top, dtype=torch.long, device=d),
            "slots": torch.full((top,), self.trash_slot, dtype=torch.long, device=d),
            "lens": torch.zeros(top, dtype=torch.int32, device=d),
            "tables": torch.zeros(top, c.max_blocks_per_seq, dtype=torch.int32, device=d),
        }
        b["logits"] = torch.zeros(top, self.vocab_size, dtype=self.dtype, device=d)
        pool = None
        for size in reversed(self.graph_sizes):
            ctx = attention.StepContext(False, b["slots"][:size], context_lens=b["lens"][:size], block_tables=b["tables"][:size])
            attention.set_context(ctx)
            for _ in range(2):  # compile the kernels outside the capture
                b["logits"][:size] = self.model.logits(self.model(b["ids"][:size], b["positions"][:size]))
            torch.cuda.synchronize(d)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                b["logits"][:size] = self.model.logits(self.model(b["ids"][:size], b["positions"][:size]))
            pool = graph.pool()
            self.graphs[size] = graph
        attention.set_context(None)
        torch.cuda.synchronize(d)
        log.info("captured decode CUDA graphs for batch sizes %s", self.graph_sizes)
