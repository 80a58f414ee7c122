"""trtbuild_runtime: greedy output equal to transformers' generate, token for token, in float32 on CPU.

Requests join and leave the running batch mid-way, long prompts are cut into chunks, blocks run
out (preemption), prompts share a cached prefix: none of it may change a greedy token.
"""

from __future__ import annotations

import time

import pytest
import torch

from trtbuild.quality.accuracy import load_prompts
from trtbuild.quality.validate import DEFAULT_PROMPTS
from trtbuild_runtime import EngineConfig, SamplingParams
from trtbuild_runtime.engine import EngineLoop, LLMEngine
from trtbuild_runtime.sequence import FinishReason


def reference(checkpoint, prompts: list[list[int]], max_tokens: list[int], eos: int | None) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    for ids, n in zip(prompts, max_tokens):
        generated = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                                   pad_token_id=eos if eos is not None else 0)
        out.append(generated[0, len(ids):].tolist())
    return out


def staggered(engine: LLMEngine, prompts, max_tokens, eos, steps_between: int = 2) -> list[list[int]]:
    """Add one request every `steps_between` steps, so the batch changes while it runs."""
    pending, done = list(enumerate(prompts)), {}
    while pending or engine.has_work():
        if pending:
            i, ids = pending.pop(0)
            engine.add_request(str(i), ids, SamplingParams(max_tokens=max_tokens[i], top_k=1, end_ids=(eos,) if eos is not None else ()))
        for _ in range(steps_between):
            for out in engine.step():
                if out.is_finished():
                    assert out.error is None, out.error
                    done[int(out.request_id)] = out.generated_tokens
    return [done[i] for i in range(len(prompts))]


def encode(checkpoint, texts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return [tokenizer(t)["input_ids"] for t in texts], tokenizer.eos_token_id


@pytest.fixture(scope="module")
def tiny_case(tiny_checkpoint):
    prompts = load_prompts(DEFAULT_PROMPTS)
    ids, eos = encode(tiny_checkpoint, [p.prompt for p in prompts])
    max_tokens = [12 + 5 * (i % 4) for i in range(len(ids))]  # sequences leave at different steps
    return ids, max_tokens, eos, reference(tiny_checkpoint, ids, max_tokens, eos)


CONFIGS = {
    "plain": dict(),
    "chunked-prefill": dict(max_num_tokens=8, max_batch_size=4),  # every prompt is cut into chunks
    "preemption": dict(kv_cache_num_blocks=6, kv_cache_page_size=16, max_batch_size=8),  # 6 blocks for 8 sequences
    "prefix-cache": dict(enable_kv_cache_reuse=True, kv_cache_page_size=16),
    "speculative-ngram": dict(speculative_decoding_mode="ngram", max_draft_len=4, kv_cache_page_size=16),
    "speculative-ngram-prefix-cache": dict(speculative_decoding_mode="ngram", max_draft_len=3, enable_kv_cache_reuse=True,
                                           kv_cache_page_size=16, max_batch_size=6),  # drafts cross block edges; few rows to spare
}


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_llama_greedy_equals_generate(tiny_checkpoint, tiny_case, name):
    ids, max_tokens, eos, expected = tiny_case
    engine = LLMEngine(EngineConfig(str(tiny_checkpoint), max_seq_len=96, **CONFIGS[name]))
    assert staggered(engine, ids, max_tokens, eos) == expected
    if name == "preemption":
        assert engine.scheduler.preemptions > 0
    if name.startswith("speculative"):
        assert engine.speculation.drafted > 0 and 0 < engine.speculation.accepted < engine.speculation.drafted
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block came back


def test_shared_prefix_is_served_from_the_cache(tiny_checkpoint):
    engine = LLMEngine(EngineConfig(str(tiny_checkpoint), max_seq_len=160, kv_cache_page_size=16, enable_kv_cache_reuse=True))
    system = list(range(10, 74))  # 64 tokens: 4 full blocks
    first = engine.generate([system + [5, 6, 7]], SamplingParams(max_tokens=8, top_k=1))[0]
    second = engine.generate([system + [8, 9]], SamplingParams(max_tokens=8, top_k=1))[0]
    assert first.cached_tokens == 0 and second.cached_tokens == 64
    cold = LLMEngine(EngineConfig(str(tiny_checkpoint), max_seq_len=160, kv_cache_page_size=16))
    assert cold.generate([system + [8, 9]], SamplingParams(max_tokens=8, top_k=1))[0].generated_tokens == second.generated_tokens


@pytest.mark.slow
def test_smollm2_greedy_equals_generate_over_the_shipped_prompts(smollm2):
    prompts = load_prompts(DEFAULT_PROMPTS)
    ids, eos = encode(smollm2, [p.prompt for p in prompts])
    max_tokens = [p.max_tokens for p in prompts]
    expected = reference(smollm2, ids, max_tokens, eos)
    engine = LLMEngine(EngineConfig(str(smollm2), max_seq_len=256, max_batch_size=8, max_num_tokens=64))
    assert staggered(engine, ids, max_tokens, eos, steps_between=3) == expected


# ------------------------------------------------------------------ requests that must not hurt others
@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return LLMEngine(EngineConfig(str(tiny_checkpoint), max_seq_len=64, max_batch_size=4))


@pytest.mark.parametrize("prompt, params, message", [
    ([1, 2, 3], SamplingParams(top_k=10**6), "exceeds the vocabulary"),
    ([1, 10**6], SamplingParams(), "outside the vocabulary"),
    ([1, -1], SamplingParams(), "outside the vocabulary"),
    ([], SamplingParams(), "empty"),
    ([1] * 60, SamplingParams(max_tokens=10), "max_seq_len"),
    ([1], SamplingParams(temperature=-1.0), "temperature"),
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(end_ids=(-5,)), "end_id"),
    ([1], SamplingParams(max_tokens=0), "max_tokens"),
])
def test_bad_request_is_refused_before_it_joins(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    assert not engine.has_work()


def test_a_failing_step_fails_only_its_requests_and_serving_goes_on(engine, monkeypatch):
    engine.add_request("victim", [1, 2, 3], SamplingParams(max_tokens=4, top_k=1))
    real = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda batch: (_ for _ in ()).throw(RuntimeError("injected")))
    (failed,) = engine.step()
    assert failed.finish_reason is FinishReason.ERROR and "injected" in failed.error
    monkeypatch.setattr(engine.runner, "run", real)
    (ok,) = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, top_k=1))
    assert ok.finish_reason is FinishReason.LENGTH and len(ok.generated_tokens) == 4
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_engine_loop_rejects_alone_and_cancels(tiny_checkpoint):
    loop = EngineLoop(LLMEngine(EngineConfig(str(tiny_checkpoint), max_seq_len=64))).start()
    try:
        with pytest.raises(ValueError):
            loop.add_request("bad", [1, 10**6], SamplingParams())
        loop.add_request("long", [1, 2], SamplingParams(max_tokens=60, top_k=1, ignore_eos=True))
        loop.add_request("short", [3, 4], SamplingParams(max_tokens=3, top_k=1))
        finished = {}

        def wait_for(request_id):
            deadline = time.monotonic() + 30
            while request_id not in finished:
                assert time.monotonic() < deadline, f"{request_id} never finished"
                finished.update((o.request_id, o) for o in loop.get_results(timeout=1) if o.is_finished())

        wait_for("short")
        loop.cancel_request("long")
        wait_for("long")
        assert finished["short"].finish_reason is FinishReason.LENGTH
        assert finished["long"].finish_reason in (FinishReason.ABORT, FinishReason.LENGTH)
    finally:
        loop.stop()
    assert not loop.is_running()


# ------------------------------------------------------------------ sampling
def test_sampling_is_seeded_per_request_and_honours_min_tokens(engine):
    eos = 0
    def run(seeds, **kw):
        params = [SamplingParams(max_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=s, **kw) for s in seeds]
        return [o.generated_tokens for o in engine.generate([[5, 6, 7]] * len(seeds), params)]
    alone = run([7])[0]
    assert run([7, 8, 9])[0] == alone  # neighbours do not change a seeded request
    assert run([7])[0] == alone
    assert len({tuple(t) for t in run([1, 2, 3, 4])}) > 1
    greedy = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, top_k=1))[0].generated_tokens
    assert engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0))[0].generated_tokens == greedy
    first = greedy[0]
    held = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, top_k=1, end_ids=(first,), min_tokens=2))[0]
    assert first not in held.generated_tokens[:2] and held.generated_tokens != greedy[:3]


def test_log_probs_are_the_models(engine, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, top_k=1, logprobs=True))[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7] + out.generated_tokens])
    logp = torch.log_softmax(model(ids).logits[0, 2:-1].float(), -1)
    expected = logp.gather(1, torch.tensor(out.generated_tokens)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_short_prompts_as_decode_rows_equal_generate(tiny_checkpoint, tiny_case, prefix_caching):
    """On CUDA a prompt step that fits a captured graph runs as decode rows (one per token, each with
    its own context length); forced here on the CPU, where the same rows run eagerly."""
    ids, max_tokens, eos, expected = tiny_case
    engine = LLMEngine(EngineConfig(str(tiny_checkpoint), max_seq_len=96, max_num_tokens=24, max_batch_size=6,
                                    kv_cache_page_size=16, enable_kv_cache_reuse=prefix_caching))
    engine.runner._fits_graph = lambda batch: batch.is_prefill and batch.total_tokens <= 24
    assert staggered(engine, ids, max_tokens, eos) == expected
