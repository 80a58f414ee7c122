"""The serving policy: presets and overrides render into Triton's own config schema, impossible
combinations are refused before anything is written, and on the real local tritonserver (rate
limiter on) priorities reorder a full queue, a full queue and a queue timeout reject with a status,
the response cache hits, and a bounded overload ends with every request accounted for by client and
server alike.

The queue is kept full with a "blocker": a direct preprocessing call whose 2 MB text takes the
single preprocessing instance a second or more to tokenize (it then fails the max_input_len check).
Every step waits on Triton's own pending-request gauge, never on a clock.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
from click.testing import CliRunner

from trtbuild.cli import main
from trtbuild.errors import TrtbuildError
from trtbuild.runtimes import generate
from trtbuild.repository.render import load_manifest, read_configs as _configs
from trtbuild.repository.serving import PROFILES, QueuePolicy, ServerFlags, ServingPolicy, policy_from_options, repository_policy
from trtbuild.deploy.server import TritonServer
from trtbuild.clients.generate import GenerationError, generate as generate_text

LEVEL2_QUEUE = 6  # default (low) priority level: max_queue_size
TEST_POLICY = dict(priority_levels=2, preferred_batch_size=[1], max_queue_delay_us=0, instances=1,
                   max_queue_size=LEVEL2_QUEUE, queue_timeout_us=60_000_000, allow_timeout_override=True,
                   priority_queue_policy=["1:max_queue_size=16"], response_cache=True, response_cache_bytes=8 << 20,
                   model_policy=["preprocessing:resource.cpu=1", "postprocessing:resource.cpu=1,limiter_priority=2"],
                   rate_limit_resource=["cpu:2"])


def _spec(tiny_spec, policy: ServingPolicy):
    return dataclasses.replace(tiny_spec, max_output_len=32, serving=policy)




# ------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("profile", PROFILES)
def test_each_preset_renders_into_the_configs_it_concerns(tiny_spec, tmp_path, profile):
    policy = policy_from_options(tiny_spec.max_batch_size, serving_profile=profile)
    repo = generate(_spec(tiny_spec, policy), tmp_path / "repo")
    configs = _configs(repo)
    for name in ("preprocessing", "postprocessing"):
        batcher = configs[name].dynamic_batching
        assert batcher.max_queue_delay_microseconds == policy.max_queue_delay_us
        assert tuple(batcher.preferred_batch_size) == policy.preferred_batch_sizes
        assert batcher.priority_levels == policy.priority_levels
        assert batcher.default_priority_level == policy.default_priority_level
        assert batcher.default_queue_policy.max_queue_size == policy.queue.max_queue_size
        assert batcher.default_queue_policy.default_timeout_microseconds == policy.queue.default_timeout_us
        assert batcher.default_queue_policy.allow_timeout_override == policy.queue.allow_timeout_override
        assert configs[name].instance_group[0].count == policy.instances
    assert configs["postprocessing"].response_cache.enable == policy.response_cache
    assert not configs["preprocessing"].response_cache.enable  # it answers bad prompts with errors
    # the text model every entry point ends in queues by priority under the queue policy; decoupled,
    # it neither delays nor caches; the entry points are ensembles, with no queue or cache of their own
    llm = configs["llm"].dynamic_batching
    assert (llm.priority_levels, llm.default_priority_level) == (policy.priority_levels, policy.default_priority_level)
    assert llm.default_queue_policy.max_queue_size == policy.queue.max_queue_size
    assert llm.max_queue_delay_microseconds == 0 and not configs["llm"].response_cache.enable
    for name in ("llm_bls", "ensemble"):
        assert not configs[name].response_cache.enable and not configs[name].HasField("dynamic_batching")
    # one source of truth: the repository records the policy and the server flags follow from it
    assert repository_policy(load_manifest(repo)) == policy
    flags = ServerFlags.for_policy(policy)
    command = TritonServer(repo, log_path=tmp_path / "log").command()
    assert (f"--cache-config=local,size={policy.response_cache_bytes}" in command) == policy.response_cache
    assert flags.rate_limit is None


def test_no_profile_changes_nothing(tiny_spec, tmp_path):
    plain = _configs(generate(tiny_spec, tmp_path / "plain"))
    assert not plain["llm_bls"].HasField("dynamic_batching")
    assert plain["preprocessing"].dynamic_batching.max_queue_delay_microseconds == 100
    assert not plain["preprocessing"].response_cache.enable
    assert not plain["preprocessing"].dynamic_batching.HasField("default_queue_policy")


def test_options_override_the_preset(tiny_spec, tmp_path):
    policy = policy_from_options(4, serving_profile="latency", max_queue_size=3, queue_timeout_us=2000, timeout_action="delay",
                                 priority_queue_policy=["1:max_queue_size=9,default_timeout_us=250"],
                                 model_policy=["postprocessing:instances=3,response_cache=false"])
    assert policy.queue == QueuePolicy(3, 2000, "DELAY", True)
    assert policy.max_queue_delay_us == 0 and policy.instances == 2  # kept from the preset
    configs = _configs(generate(_spec(tiny_spec, policy), tmp_path / "repo"))
    level1 = configs["preprocessing"].dynamic_batching.priority_queue_policy[1]
    assert (level1.max_queue_size, level1.default_timeout_microseconds, level1.timeout_action) == (9, 250, 1)  # DELAY
    assert configs["preprocessing"].instance_group[0].count == 2
    assert configs["postprocessing"].instance_group[0].count == 3
    assert not configs["postprocessing"].response_cache.enable


def test_the_tensorrtllm_step_queues_by_priority_but_keeps_its_own_batching(tiny_spec, tmp_path):
    """NVIDIA's C++ model is decoupled with a dynamic batcher: priorities and the queue policy reach
    it, its batching stays as NVIDIA configures it, and it never gets a response cache."""
    from trtbuild.runtimes.tensorrtllm import plan as plan_llm_repository
    from trtbuild.repository.render import render
    from trtbuild.repository.serving import apply_policy

    policy = policy_from_options(tiny_spec.max_batch_size, serving_profile="latency")
    spec = dataclasses.replace(tiny_spec, runtime="tensorrtllm", engine_dir=tmp_path, serving=policy)
    configs = {m.plan.name: m.config for m in render(apply_policy(plan_llm_repository(spec), policy))}
    batcher = configs["tensorrt_llm"].dynamic_batching
    assert batcher.priority_levels == 2 and batcher.default_queue_policy.max_queue_size == policy.queue.max_queue_size
    assert batcher.max_queue_delay_microseconds == 0 and list(batcher.preferred_batch_size) == [spec.max_batch_size]
    assert not configs["tensorrt_llm"].response_cache.enable


def test_rate_limiter_resources_and_server_flags(tiny_spec, tmp_path):
    policy = policy_from_options(4, model_policy=["llm:resource.gpu=2,limiter_priority=1",
                                                  "preprocessing:resource.gpu=1,limiter_priority=2"],
                                 rate_limit_resource=["gpu:2"])
    repo = generate(_spec(tiny_spec, policy), tmp_path / "repo")
    configs = _configs(repo)
    limiter = configs["preprocessing"].instance_group[0].rate_limiter
    assert [(r.name, r.count) for r in limiter.resources] == [("gpu", 1)] and limiter.priority == 2
    assert [(r.name, r.count) for r in configs["llm"].instance_group[0].rate_limiter.resources] == [("gpu", 2)]
    command = TritonServer(repo, log_path=tmp_path / "log").command()
    assert "--rate-limit=execution_count" in command and "--rate-limit-resource=gpu:2" in command


# ------------------------------------------------------------------------------ refused
@pytest.mark.parametrize("options, message", [
    (dict(model_policy=["llm:response_cache=true"]), "decoupled; Triton's response cache refuses"),
    (dict(model_policy=["llm_bls:response_cache=true"]), "is an ensemble"),
    (dict(model_policy=["preprocessing:response_cache=true"]), "would store as an empty success"),
    (dict(priority_levels=2, default_priority_level=3), "default-priority-level 3 is outside 1..2"),
    (dict(priority_levels=2, priority_queue_policy=["3:max_queue_size=4"]), "level 3 is outside 1..2"),
    (dict(priority_queue_policy=["1:max_queue_size=4"]), "needs --priority-levels"),
    (dict(preferred_batch_size=[8]), "preferred-batch-size 8 is outside 1..4"),
    (dict(model_policy=["ensemble:max_queue_size=4"]), "is an ensemble"),
    (dict(model_policy=["llm_bls:default_timeout_us=1000"]), "is an ensemble"),
    (dict(model_policy=["llm:instances=2"]), "fixed number of instances"),
    (dict(model_policy=["tokenizer:instances=2"]), "lacks"),
    (dict(model_policy=["llm:resource.gpu=3"], rate_limit_resource=["gpu:2"]), "could never run"),
    (dict(max_queue_size=-1), "max_queue_size must be an integer >= 0"),
    (dict(allow_timeout_override=True), "allow_timeout_override without a default timeout does nothing"),
    (dict(model_policy=["preprocessing:colour=blue"]), "unknown key"),
])
def test_impossible_combinations_are_refused_before_anything_is_written(tiny_spec, tmp_path, options, message):
    out = tmp_path / "repo"
    with pytest.raises(TrtbuildError, match=re.escape(message)):
        generate(_spec(tiny_spec, policy_from_options(tiny_spec.max_batch_size, **options)), out)
    assert not out.exists()


def test_cli_repo_takes_the_profile_and_overrides(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    out = tmp_path / "repo"
    args = ["repo", str(tiny_checkpoint), "--out", str(out), "--max-batch-size", "4", "--max-input-len", "64",
            "--max-output-len", "16", "--serving-profile", "throughput", "--max-queue-size", "12",
            "--model-policy", "postprocessing:instances=2"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    configs = _configs(out)
    assert list(configs["preprocessing"].dynamic_batching.preferred_batch_size) == [4]
    assert configs["preprocessing"].dynamic_batching.default_queue_policy.max_queue_size == 12
    assert configs["postprocessing"].instance_group[0].count == 2
    assert configs["llm"].dynamic_batching.default_queue_policy.max_queue_size == 12
    bad = runner.invoke(main, [*args[:3], str(tmp_path / "bad"), *args[4:], "--model-policy", "llm:response_cache=true"])
    assert bad.exit_code == 2 and "response cache refuses decoupled models" in bad.output
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------ the real server
def _pending(server: TritonServer, model: str) -> int:
    match = re.search(rf'nv_inference_pending_request_count{{model="{model}",version="1"}} (\S+)', server.metrics())
    return int(float(match.group(1))) if match else 0


def _wait_pending(server: TritonServer, model: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _pending(server, model) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"'{model}' never held {count} pending requests (has {_pending(server, model)}): "
                                 "the blocker ended too soon")
        time.sleep(0.01)


def _stats(server: TritonServer, model: str) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.load(r)["model_stats"][0]["inference_stats"]
    return {k: int(v["count"]) for k, v in stats.items()}


def _metric(server: TritonServer, name: str, model: str) -> float:
    match = re.search(rf'{name}{{model="{model}",version="1"}} (\S+)', server.metrics())
    return float(match.group(1)) if match else 0.0


def _inputs(arrays: dict[str, np.ndarray]):
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array in arrays.items():
        dtype = "BYTES" if array.dtype == np.object_ else {np.int32: "INT32", np.bool_: "BOOL"}[array.dtype.type]
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class Stream:
    """One gRPC stream carrying many requests: final responses arrive in the order the server
    completed them, so that order needs no clock."""

    def __init__(self, server: TritonServer):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.finals: list[tuple[str, str | None]] = []  # (request id, error or None) in completion order
        self.arrived = threading.Condition()
        self.client.start_stream(callback=self._on_response)

    def _on_response(self, result, error):
        with self.arrived:
            if error is not None:
                found = re.search(r"\[request id: (\S+?)\]", str(error))
                self.finals.append((found.group(1) if found else "?", str(error)))
            elif result.get_response().parameters["triton_final_response"].bool_param:
                self.finals.append((result.get_response().id, None))
            self.arrived.notify_all()

    def send(self, model: str, tag: str, priority: int = 0, timeout_us: int | None = None, max_tokens: int = 1,
             text: str | None = None) -> None:
        arrays = {"text_input": np.array([[(text or f"Request {tag} says hello").encode()]], dtype=np.object_),
                  "max_tokens": np.array([[max_tokens]], np.int32), "stream": np.array([[False]])}
        self.client.async_stream_infer(model, _inputs(arrays), request_id=tag, priority=priority, timeout=timeout_us,
                                       enable_empty_final_response=True)

    def wait(self, count: int, timeout: float = 120.0) -> list[tuple[str, str | None]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.finals) >= count, timeout), f"only {len(self.finals)} of {count} answered"
            return list(self.finals)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


class Blocker:
    """Keeps the text model's single instance busy: tokenizing 2 MB of text, then failing the
    max_input_len check (a clear error, which is what it gets)."""

    TEXT = "The quick brown fox jumps over the lazy dog. " * 45_000

    def __init__(self, server: TritonServer, count: int = 2):
        self.stream, self.count = Stream(server), count
        for i in range(count):
            # apart, so the text model's batcher cannot take them in one batch: one runs, the rest wait
            time.sleep(0.2 if i else 0.0)
            self.stream.send("llm", f"blocker{i}", text=self.TEXT)
        _wait_pending(server, "llm", 1)  # the instance is busy

    def join(self) -> None:
        finals = self.stream.wait(self.count)
        self.stream.close()
        assert all(error and "more than max_input_len" in error for _, error in finals), finals


@pytest.fixture(scope="module")
def policy_server(tiny_spec, tmp_path_factory):
    policy = policy_from_options(tiny_spec.max_batch_size, **TEST_POLICY)
    repo = generate(_spec(tiny_spec, policy), tmp_path_factory.mktemp("policy") / "model_repo")
    server = TritonServer(repo, log_path=tmp_path_factory.mktemp("policy-log") / "tritonserver.log")
    server.start()
    try:
        warm = Stream(server)
        for model in ("ensemble", "llm_bls"):
            warm.send(model, f"warm-{model}")
        warm.wait(2)
        warm.close()
        yield server
    finally:
        server.stop()


@pytest.mark.server
def test_high_priority_requests_overtake_queued_low_priority_ones(policy_server):
    """The ensemble gives its priority to its step; the blocked text model's queue then serves level 1
    before level 2."""
    server, stream = policy_server, Stream(policy_server)
    try:
        blocker = Blocker(server)  # the second blocker waits at level 2, ahead of the low ones
        lows, highs = [f"low{i}" for i in range(3)], [f"high{i}" for i in range(3)]
        for tag in lows:
            stream.send("ensemble", tag, priority=2)
        _wait_pending(server, "llm", 1 + len(lows))
        for tag in highs:
            stream.send("ensemble", tag, priority=1)
        _wait_pending(server, "llm", 1 + len(lows) + len(highs))
        finals = stream.wait(len(lows) + len(highs))
        blocker.join()
    finally:
        stream.close()
    assert [error for _, error in finals if error] == []
    order = [tag for tag, _ in finals]
    print(f"\ncompletion order: {order}")
    assert max(order.index(t) for t in highs) < min(order.index(t) for t in lows), order


@pytest.mark.server
@pytest.mark.parametrize("model", ["ensemble", "llm_bls"])
def test_a_full_queue_rejects_with_a_clear_status_the_client_reports(policy_server, model):
    """Both entry points relay the status of the step that refused it."""
    server, stream = policy_server, Stream(policy_server)
    try:
        blocker = Blocker(server)  # the second blocker holds one of the level-2 places
        fillers = [f"{model}-fill{i}" for i in range(LEVEL2_QUEUE - 1)]
        for tag in fillers:
            stream.send("ensemble", tag)
        _wait_pending(server, "llm", LEVEL2_QUEUE)
        with pytest.raises(GenerationError, match="Exceeds maximum queue size") as rejected:
            generate_text(server.grpc_url, "one request too many", 1, model=model)
        stream.send("ensemble", f"{model}-urgent", priority=1)  # level 1 has a queue of its own
        finals = stream.wait(len(fillers) + 1)
        blocker.join()
    finally:
        stream.close()
    print(f"\n{model} rejection seen by trtbuild.clients.generate: {rejected.value}")
    assert [error for _, error in finals if error] == []


@pytest.mark.server
@pytest.mark.parametrize("model", ["ensemble", "llm_bls"])
def test_a_timed_out_request_is_rejected_not_dropped(policy_server, model):
    server, stream = policy_server, Stream(policy_server)
    before = _stats(server, "llm")
    try:
        blocker = Blocker(server)
        stream.send(model, f"{model}-hurried", priority=1, timeout_us=100_000)  # the ensemble passes it to its step
        finals = stream.wait(1)
        blocker.join()
    finally:
        stream.close()
    (_, error), = finals
    print(f"\n{model} timed-out request: {error}")
    assert error is not None and "Request timeout expired" in error
    assert _stats(server, "llm")["fail"] == before["fail"] + 1  # counted as a failure (REJECTED)


@pytest.mark.server
def test_a_repeated_request_is_a_cache_hit(policy_server):
    """The deterministic models (the detokenizer here, called directly: the entry points go to the
    text model) answer a repeated request from Triton's response cache."""
    import tritonclient.grpc as grpcclient

    server, model = policy_server, "postprocessing"
    stats_before, metric_before = _stats(server, model), _metric(server, "nv_cache_num_hits_per_model", model)
    arrays = {"TOKENS_BATCH": np.array([[[72, 101, 108, 108, 111]]], np.int32), "SEQUENCE_LENGTH": np.array([[5]], np.int32)}
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        first, second = (client.infer(model, _inputs(arrays)).as_numpy("OUTPUT") for _ in range(2))
    finally:
        client.close()
    stats_after = _stats(server, model)
    hits, misses = (stats_after[k] - stats_before[k] for k in ("cache_hit", "cache_miss"))
    print(f"\ncache hits {hits}, misses {misses}")
    assert second.tolist() == first.tolist()
    assert (hits, misses) == (1, 1)
    assert _metric(server, "nv_cache_num_hits_per_model", model) == metric_before + 1


@pytest.mark.server
def test_a_repeated_bad_request_gets_the_same_clear_error(policy_server):
    """With a cache on preprocessing, Triton would answer the repeat with an empty success (see
    trtbuild.repository.serving.INPUT_ERROR_TEMPLATES) and the LLM step would fail with a misleading message."""
    errors = []
    for _ in range(2):
        with pytest.raises(GenerationError) as e:
            generate_text(policy_server.grpc_url, "word " * 300, 2)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "more than max_input_len" in errors[1]


@pytest.mark.server
def test_bounded_overload_ends_with_every_request_answered_and_counted(policy_server, tiny_spec):
    """A burst far above what the blocked text model's queue holds: every request completes or is
    rejected with a status, none hangs, and the ensemble's statistics count what the client saw."""
    from trtbuild.bench.run import BenchConfig, run_benchmark
    from trtbuild.bench.loadgen import LoadPoint
    from trtbuild.clients.prompts import LengthDistribution

    server, requests = policy_server, 80
    assert "--rate-limit=execution_count" in server.command() and "--rate-limit-resource=cpu:2" in server.command()
    config = BenchConfig(url=server.grpc_url, model="ensemble", stream=True, requests=requests, warmup=0,
                         loads=(LoadPoint(request_rate=100.0, arrival="constant"),), input_tokens=LengthDistribution(16),
                         output_tokens=LengthDistribution(8), tokenizer=tiny_spec.checkpoint, request_timeout=30.0,
                         max_errors=None)
    blocker = Blocker(server)
    started = time.monotonic()
    run, = run_benchmark(config).runs
    elapsed = time.monotonic() - started
    blocker.join()
    records = run.records
    ok = [r for r in records if r.ok]
    full = [r for r in records if r.error and "Exceeds maximum queue size" in r.error]
    timed_out = [r for r in records if r.error and "Request timeout expired" in r.error]
    print(f"\nsoak: {len(records)} sent in {elapsed:.1f} s: {len(ok)} completed, {len(full)} rejected (queue full), "
          f"{len(timed_out)} rejected (timeout); ensemble statistics {run.server}")
    assert len(records) == requests and run.aborted is None
    assert len(ok) + len(full) + len(timed_out) == requests  # nothing hangs, nothing fails without a status
    assert full  # the burst was above what the queue holds
    assert run.server["success_count"] == len(ok)
    # Triton 2.51 counts a failed ensemble request twice: once when it answers with the error
    # (EnsembleContext::FinishEnsemble -> RespondIfError) and again when its request tracker ends
    assert run.server["fail_count"] == 2 * (len(full) + len(timed_out))
