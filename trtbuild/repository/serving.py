"""Serving policy: how Triton queues, orders, batches, caches and shares the models it serves.

One typed `ServingPolicy` in the build spec is rendered into every config.pbtxt it concerns:

- dynamic batcher of the non-decoupled steps (preprocessing, postprocessing, ONNX models):
  `max_queue_delay_microseconds`, `preferred_batch_size`;
- instance counts of those steps;
- priority levels (`priority_levels`, `default_priority_level`, a queue policy per level) and the
  queue policy (`max_queue_size`, `default_timeout_microseconds`, `timeout_action` REJECT|DELAY,
  `allow_timeout_override`) on every model with a dynamic batcher (the non-decoupled steps and
  NVIDIA's decoupled `tensorrt_llm`, whose batching stays as NVIDIA sets it);
- `response_cache { enable: true }` on the deterministic non-decoupled models that never answer a
  request with an error of its own making (see INPUT_ERROR_TEMPLATES);
- `instance_group { rate_limiter { resources [...] priority } }`, so several models or tenants
  share one GPU with guaranteed shares (`trtbuild serve` then runs with `--rate-limit
  execution_count` and `--rate-limit-resource`).

Presets (`--serving-profile`), each value with why:

- latency:
  - max_queue_delay_us 0: never hold a request back to grow a batch.
  - preferred_batch_sizes (): dispatch whatever is queued as soon as an instance is free.
  - instances 2: a second tokenizer instance, so no request waits behind another's tokenization.
  - priority_levels 2, default 2: interactive clients send priority 1 and overtake the rest.
  - max_queue_size 2 x max_batch_size: shed load early; a long queue only adds latency.
  - queue timeout 500 ms, REJECT, overridable: a request queued that long has missed an
    interactive deadline; an error lets the client retry elsewhere. A client may ask for less
    (Triton lets a request only shorten the default, so overriding needs a default timeout).
  - response cache on: a repeated answer skips detokenization (and an ONNX encoder's run).
- throughput:
  - max_queue_delay_us 5000: wait up to 5 ms so batches fill.
  - preferred_batch_sizes (max_batch_size,): full batches amortize per-call overhead.
  - instances 1: batching does the work and leaves CPU cores to the LLM runtime.
  - priority_levels 0: one FIFO queue; ordering costs nothing here.
  - max_queue_size 0, no timeout, no override: never reject; keep the accelerator fed.
  - response cache off: hashing every input costs CPU and batch jobs rarely repeat prompts.
- balanced:
  - max_queue_delay_us 1000: small batches form under load at a 1 ms cost.
  - preferred_batch_sizes (): any batch size.
  - instances 1.
  - priority_levels 2, default 2: priority is available without being required.
  - max_queue_size 8 x max_batch_size: bounded memory, rejections only under real overload.
  - queue timeout 30 s, REJECT, overridable: a ceiling on queueing that clients can lower.
  - response cache on.

No profile leaves every model as the repository generator plans it. Priorities and timeouts of a
request travel with it: Triton 2.51's ensemble copies the caller's priority and timeout to its step.
Both entry points (`ensemble`, `llm_bls`) are ensembles onto the text model (`llm`), whose dynamic
batcher is where priority levels and queue policies act: it queues while the model is busy taking
requests (tokenizing), hands each to the engine at once, and the engine then serves first come,
first served (above capacity requests wait inside it instead of being rejected). Decoupled, the
text model neither delays to form batches nor takes the response cache; the tokenizer models called
directly do.

Triton 2.51 limits this works within: a request's own timeout only shortens a queue's default
timeout (none without one); a request refused at a model's full queue never reaches that model's
/v2/models/*/stats (queue timeouts count as failures); an ensemble request that fails counts twice
in the ensemble's fail count; a priority above priority_levels silently becomes the default level.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from trtbuild.errors import TrtbuildError

PROFILES = ("latency", "throughput", "balanced")
# Models that answer some inputs with an error (prompt too long, empty text). Triton's response
# cache (2.51, and core main as of 2026) stores every response without looking at its status, so a
# repeated bad request would get an empty "success" from the cache instead of the error, and the
# next ensemble step fails with a misleading message: no cache on these.
INPUT_ERROR_TEMPLATES = ("preprocessing", "onnx_text_preprocessing", "onnx_greedy_llm", "onnx_python")
TIMEOUT_ACTIONS = ("REJECT", "DELAY")
DEFAULT_CACHE_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy; the defaults are Triton's own."""

    max_queue_size: int = 0  # 0: unbounded
    default_timeout_us: int = 0  # 0: requests wait for ever
    timeout_action: str = "REJECT"
    allow_timeout_override: bool = False

    @property
    def is_default(self) -> bool:
        return self == QueuePolicy()

    def validate(self, where: str) -> None:
        if self.timeout_action not in TIMEOUT_ACTIONS:
            raise TrtbuildError(f"{where}: timeout_action {self.timeout_action!r} is not REJECT or DELAY")
        for name in ("max_queue_size", "default_timeout_us"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise TrtbuildError(f"{where}: {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.allow_timeout_override and not self.default_timeout_us:
            raise TrtbuildError(f"{where}: allow_timeout_override without a default timeout does nothing: Triton only "
                                "lets a request shorten the default timeout", hint="set --queue-timeout-us too")


@dataclasses.dataclass(frozen=True)
class RateLimiter:
    """What one instance of a model needs from the rate limiter to run, and its weight."""

    resources: tuple[tuple[str, int], ...]
    priority: int = 1  # an instance of priority 2 gets half the turns of priority 1


@dataclasses.dataclass(frozen=True)
class ModelServing:
    """Settings for one named model that differ from the policy's; None keeps the policy's."""

    instances: int | None = None
    response_cache: bool | None = None
    max_queue_size: int | None = None
    default_timeout_us: int | None = None
    timeout_action: str | None = None
    allow_timeout_override: bool | None = None
    rate_limiter: RateLimiter | None = None

    QUEUE_FIELDS = ("max_queue_size", "default_timeout_us", "timeout_action", "allow_timeout_override")

    @property
    def sets_queue(self) -> bool:
        return any(getattr(self, f) is not None for f in self.QUEUE_FIELDS)

    def queue(self, base: QueuePolicy) -> QueuePolicy:
        return dataclasses.replace(base, **{f: getattr(self, f) for f in self.QUEUE_FIELDS if getattr(self, f) is not None})


@dataclasses.dataclass(frozen=True)
class ServingPolicy:
    """How the server queues, orders, batches, caches and shares; see the module docstring."""

    profile: str | None = None
    max_queue_delay_us: int | None = None  # None: each model's planned delay
    preferred_batch_sizes: tuple[int, ...] | None = None  # None: each model's planned sizes
    instances: int | None = None  # non-decoupled steps; None: the planned counts
    priority_levels: int = 0
    default_priority_level: int = 0
    queue: QueuePolicy = QueuePolicy()
    priority_queues: tuple[tuple[int, QueuePolicy], ...] = ()  # level -> its own queue policy
    response_cache: bool = False
    response_cache_bytes: int = DEFAULT_CACHE_BYTES
    models: tuple[tuple[str, ModelServing], ...] = ()
    rate_limit_resources: tuple[tuple[str, int], ...] = ()  # server totals (--rate-limit-resource)

    @classmethod
    def preset(cls, profile: str, max_batch_size: int) -> "ServingPolicy":
        if profile == "latency":
            return cls(profile, 0, (), 2, 2, 2, QueuePolicy(2 * max_batch_size, 500_000, "REJECT", True), response_cache=True)
        if profile == "throughput":
            return cls(profile, 5000, (max_batch_size,), 1, 0, 0, QueuePolicy(), response_cache=False)
        if profile == "balanced":
            return cls(profile, 1000, (), 1, 2, 2, QueuePolicy(8 * max_batch_size, 30_000_000, "REJECT", True),
                       response_cache=True)
        raise TrtbuildError(f"--serving-profile {profile!r} is not one of {', '.join(PROFILES)}")

    def model(self, name: str) -> ModelServing:
        return dict(self.models).get(name, ModelServing())

    @property
    def uses_response_cache(self) -> bool:
        return self.response_cache or any(m.response_cache for _, m in self.models)

    @property
    def uses_rate_limiter(self) -> bool:
        return any(m.rate_limiter for _, m in self.models)

    def validate(self, max_batch_size: int) -> None:
        """Checks that need no repository; `apply_policy` checks the rest per model."""
        if self.profile is not None and self.profile not in PROFILES:
            raise TrtbuildError(f"--serving-profile {self.profile!r} is not one of {', '.join(PROFILES)}")
        if self.max_queue_delay_us is not None and self.max_queue_delay_us < 0:
            raise TrtbuildError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}")
        for size in self.preferred_batch_sizes or ():
            if not 1 <= size <= max_batch_size:
                raise TrtbuildError(f"--preferred-batch-size {size} is outside 1..{max_batch_size} (the max batch size)",
                                    hint="lower it or raise --max-batch-size")
        if self.instances is not None and self.instances < 1:
            raise TrtbuildError(f"--instances must be at least 1, got {self.instances}")
        if self.priority_levels < 0:
            raise TrtbuildError(f"--priority-levels must be >= 0, got {self.priority_levels}")
        if self.priority_levels == 0:
            if self.default_priority_level:
                raise TrtbuildError(f"--default-priority-level {self.default_priority_level} needs --priority-levels >= "
                                    f"{self.default_priority_level}")
            if self.priority_queues:
                raise TrtbuildError("--priority-queue-policy needs --priority-levels")
        elif not 1 <= self.default_priority_level <= self.priority_levels:
            raise TrtbuildError(f"--default-priority-level {self.default_priority_level} is outside 1..{self.priority_levels} "
                                "(--priority-levels)")
        self.queue.validate("queue policy")
        levels = [level for level, _ in self.priority_queues]
        for level, policy in self.priority_queues:
            if not 1 <= level <= self.priority_levels:
                raise TrtbuildError(f"--priority-queue-policy: level {level} is outside 1..{self.priority_levels} "
                                    "(--priority-levels)")
            policy.validate(f"--priority-queue-policy level {level}")
        if len(set(levels)) != len(levels):
            raise TrtbuildError("--priority-queue-policy names a level twice")
        if self.uses_response_cache and self.response_cache_bytes < 1:
            raise TrtbuildError(f"--response-cache-bytes must be positive, got {self.response_cache_bytes}")
        totals = dict(self.rate_limit_resources)
        for name, count in self.rate_limit_resources:
            if not name or count < 1:
                raise TrtbuildError(f"--rate-limit-resource {name}:{count}: give a name and a count >= 1")
        for model, serving in self.models:
            where = f"--model-policy {model}"
            if serving.instances is not None and serving.instances < 1:
                raise TrtbuildError(f"{where}: instances must be at least 1, got {serving.instances}")
            serving.queue(self.queue).validate(where)
            limiter = serving.rate_limiter
            if limiter is None:
                continue
            if limiter.priority < 1:
                raise TrtbuildError(f"{where}: limiter_priority must be at least 1, got {limiter.priority}")
            for name, count in limiter.resources:
                if count < 1:
                    raise TrtbuildError(f"{where}: resource {name} needs a count >= 1, got {count}")
                if name in totals and count > totals[name]:
                    raise TrtbuildError(f"{where}: an instance needs {count} of resource {name} but the server has "
                                        f"{totals[name]} (--rate-limit-resource); it could never run")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "ServingPolicy":
        if not data:
            return cls()

        def queue(d):
            return QueuePolicy(**d)

        def model(d):
            d = dict(d)
            if d.get("rate_limiter"):
                limiter = d["rate_limiter"]
                d["rate_limiter"] = RateLimiter(tuple((n, int(c)) for n, c in limiter["resources"]), int(limiter["priority"]))
            return ModelServing(**d)

        return cls(
            profile=data.get("profile"),
            max_queue_delay_us=data.get("max_queue_delay_us"),
            preferred_batch_sizes=None if data.get("preferred_batch_sizes") is None else tuple(data["preferred_batch_sizes"]),
            instances=data.get("instances"),
            priority_levels=int(data.get("priority_levels", 0)),
            default_priority_level=int(data.get("default_priority_level", 0)),
            queue=queue(data.get("queue") or {}),
            priority_queues=tuple((int(level), queue(p)) for level, p in data.get("priority_queues") or ()),
            response_cache=bool(data.get("response_cache", False)),
            response_cache_bytes=int(data.get("response_cache_bytes", DEFAULT_CACHE_BYTES)),
            models=tuple((name, model(m)) for name, m in data.get("models") or ()),
            rate_limit_resources=tuple((n, int(c)) for n, c in data.get("rate_limit_resources") or ()),
        )


# ------------------------------------------------------------------------------ per model
@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What a planned model's own config says about which settings it can honour."""

    name: str
    ensemble: bool
    decoupled: bool
    batcher: bool  # its template renders a dynamic batcher (a `batching` entry in its plan)
    instances: bool  # its template takes an instance count
    max_batch_size: int
    answers_input_errors: bool  # see INPUT_ERROR_TEMPLATES


def model_facts(plan, env=None) -> ModelFacts:
    from trtbuild.repository.templates import environment, parse_config, render_template

    config = parse_config(render_template(env or environment(), plan.config_template, plan), plan.name, plan.config_template)
    return ModelFacts(
        name=plan.name,
        ensemble=config.platform == "ensemble",
        decoupled=config.model_transaction_policy.decoupled,
        batcher="batching" in plan.context,
        instances="instances" in plan.context,
        max_batch_size=config.max_batch_size,
        answers_input_errors=plan.template in INPUT_ERROR_TEMPLATES,
    )


def apply_policy(plans: list, policy: ServingPolicy, env=None) -> list:
    """The plans with the policy written into their contexts; every impossible setting is an error here,
    before anything is rendered or written."""
    names = [p.name for p in plans]
    unknown = [name for name, _ in policy.models if name not in names]
    if unknown:
        raise TrtbuildError(f"--model-policy names model '{unknown[0]}', which this repository lacks",
                            hint=f"models: {', '.join(names)}")
    out = []
    for plan in plans:
        facts = model_facts(plan, env)
        own = policy.model(plan.name)
        where = f"--model-policy {plan.name}"
        context = dict(plan.context)
        if facts.ensemble:
            if own.sets_queue or own.instances is not None or own.response_cache or own.rate_limiter:
                raise TrtbuildError(f"{where}: '{plan.name}' is an ensemble; it has no queue, instances or cache of its "
                                    "own (its steps do)", hint="set these on the steps instead")
            out.append(plan)
            continue
        # queue, priorities and batching
        if not facts.batcher:
            if own.sets_queue:
                raise TrtbuildError(f"{where}: '{plan.name}' is decoupled without a dynamic batcher, so no queue policy "
                                    "reaches it", hint="set the queue policy on the models in front of it")
        else:
            queue = own.queue(policy.queue)
            priority_queues = tuple((level, q) for level, q in policy.priority_queues if q != queue)
            batching = context.get("batching")
            if batching is not None:
                changes: dict[str, Any] = {}
                if not facts.decoupled:
                    if policy.max_queue_delay_us is not None:
                        changes["max_queue_delay_us"] = policy.max_queue_delay_us
                    if policy.preferred_batch_sizes is not None:
                        changes["preferred_batch_sizes"] = tuple(policy.preferred_batch_sizes)
                sizes = changes.get("preferred_batch_sizes", batching.preferred_batch_sizes)
                too_big = [s for s in sizes if s > max(facts.max_batch_size, 1)]
                if too_big:
                    raise TrtbuildError(f"model '{plan.name}': preferred batch size {too_big[0]} is above its max batch "
                                        f"size {facts.max_batch_size}")
                changes.update(
                    priority_levels=policy.priority_levels,
                    default_priority_level=policy.default_priority_level,
                    queue_policy=None if queue.is_default else queue,
                    priority_queue_policies=priority_queues,
                )
                context["batching"] = dataclasses.replace(batching, **changes)
        # instances
        if own.instances is not None and not facts.instances:
            raise TrtbuildError(f"{where}: '{plan.name}' runs a fixed number of instances (it batches in flight)")
        if facts.instances:
            if own.instances is not None:
                context["instances"] = own.instances
            elif policy.instances is not None and not facts.decoupled:
                context["instances"] = policy.instances
        # response cache
        if own.response_cache and facts.decoupled:
            raise TrtbuildError(f"{where}: '{plan.name}' is decoupled; Triton's response cache refuses decoupled models")
        if own.response_cache and facts.answers_input_errors:
            raise TrtbuildError(f"{where}: '{plan.name}' answers some inputs with an error, which Triton's response cache "
                                "would store as an empty success", hint="cache the models after it instead")
        cacheable = not facts.decoupled and not facts.answers_input_errors
        cache = own.response_cache if own.response_cache is not None else (policy.response_cache and cacheable)
        context["response_cache"] = bool(cache)
        context["rate_limiter"] = own.rate_limiter
        out.append(dataclasses.replace(plan, context=context))
    return out


# ------------------------------------------------------------------------------ server flags
@dataclasses.dataclass(frozen=True)
class ServerFlags:
    """The tritonserver flags a repository's policy needs."""

    response_cache_bytes: int = 0
    rate_limit: str | None = None
    rate_limit_resources: tuple[tuple[str, int], ...] = ()

    @classmethod
    def for_policy(cls, policy: ServingPolicy) -> "ServerFlags":
        return cls(
            response_cache_bytes=policy.response_cache_bytes if policy.uses_response_cache else 0,
            rate_limit="execution_count" if policy.uses_rate_limiter else None,
            rate_limit_resources=policy.rate_limit_resources,
        )

    @property
    def args(self) -> tuple[str, ...]:
        return tuple(f"--rate-limit-resource={name}:{count}" for name, count in self.rate_limit_resources)


def repository_policy(manifest: dict[str, Any]) -> ServingPolicy:
    """The policy a repository was generated with (trtbuild.json), or the empty one."""
    data = manifest.get("serving") or (manifest.get("spec") or {}).get("serving")
    return ServingPolicy.from_json(data)


# ------------------------------------------------------------------------------ command line
def _pairs(text: str, what: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TrtbuildError(f"{what}: '{item}' is not key=value")
        out[key.strip()] = value.strip()
    return out


def _bool(value: str, what: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise TrtbuildError(f"{what}: {value!r} is not true or false")


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise TrtbuildError(f"{what}: {value!r} is not an integer") from None


def _queue_fields(pairs: dict[str, str], what: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key in ("max_queue_size", "default_timeout_us"):
        if key in pairs:
            fields[key] = _int(pairs.pop(key), f"{what} {key}")
    if "timeout_action" in pairs:
        fields["timeout_action"] = pairs.pop("timeout_action").upper()
    if "allow_timeout_override" in pairs:
        fields["allow_timeout_override"] = _bool(pairs.pop("allow_timeout_override"), f"{what} allow_timeout_override")
    return fields


def parse_priority_queue(text: str) -> tuple[int, dict[str, Any]]:
    """`LEVEL:max_queue_size=N,default_timeout_us=T,timeout_action=REJECT,allow_timeout_override=true`."""
    level, sep, rest = text.partition(":")
    what = f"--priority-queue-policy {text}"
    if not sep:
        raise TrtbuildError(f"{what}: write LEVEL:key=value,...")
    pairs = _pairs(rest, what)
    fields = _queue_fields(pairs, what)
    if pairs:
        raise TrtbuildError(f"{what}: unknown key(s) {', '.join(pairs)}",
                            hint="keys: max_queue_size, default_timeout_us, timeout_action, allow_timeout_override")
    return _int(level, what), fields


def parse_model_policy(text: str) -> tuple[str, ModelServing]:
    """`MODEL:instances=2,response_cache=true,max_queue_size=8,resource.gpu=1,limiter_priority=1`."""
    model, sep, rest = text.partition(":")
    what = f"--model-policy {text}"
    if not sep or not model:
        raise TrtbuildError(f"{what}: write MODEL:key=value,...")
    pairs = _pairs(rest, what)
    fields = _queue_fields(pairs, what)
    if "instances" in pairs:
        fields["instances"] = _int(pairs.pop("instances"), f"{what} instances")
    if "response_cache" in pairs:
        fields["response_cache"] = _bool(pairs.pop("response_cache"), f"{what} response_cache")
    resources = tuple((k.split(".", 1)[1], _int(pairs.pop(k), f"{what} {k}")) for k in list(pairs) if k.startswith("resource."))
    priority = _int(pairs.pop("limiter_priority"), f"{what} limiter_priority") if "limiter_priority" in pairs else None
    if pairs:
        raise TrtbuildError(f"{what}: unknown key(s) {', '.join(pairs)}",
                            hint="keys: instances, response_cache, max_queue_size, default_timeout_us, timeout_action, "
                                 "allow_timeout_override, resource.NAME, limiter_priority")
    if priority is not None and not resources:
        raise TrtbuildError(f"{what}: limiter_priority needs at least one resource.NAME=COUNT")
    if resources:
        fields["rate_limiter"] = RateLimiter(resources, 1 if priority is None else priority)
    return model, ModelServing(**fields)


def parse_resource(text: str) -> tuple[str, int]:
    name, sep, count = text.rpartition(":")
    if not sep or not name:
        raise TrtbuildError(f"--rate-limit-resource {text}: write NAME:COUNT")
    return name, _int(count, f"--rate-limit-resource {text}")


def policy_from_options(max_batch_size: int, serving_profile: str | None = None, max_queue_delay_us: int | None = None,
                        preferred_batch_size: Iterable[int] = (), instances: int | None = None,
                        priority_levels: int | None = None, default_priority_level: int | None = None,
                        max_queue_size: int | None = None, queue_timeout_us: int | None = None,
                        timeout_action: str | None = None, allow_timeout_override: bool | None = None,
                        priority_queue_policy: Iterable[str] = (), response_cache: bool | None = None,
                        response_cache_bytes: int | None = None, model_policy: Iterable[str] = (),
                        rate_limit_resource: Iterable[str] = ()) -> ServingPolicy:
    """The profile's preset (or no policy), with each given option replacing its value."""
    policy = ServingPolicy.preset(serving_profile, max_batch_size) if serving_profile else ServingPolicy()
    changes: dict[str, Any] = {}
    if max_queue_delay_us is not None:
        changes["max_queue_delay_us"] = max_queue_delay_us
    if preferred_batch_size:
        changes["preferred_batch_sizes"] = tuple(preferred_batch_size)
    if instances is not None:
        changes["instances"] = instances
    if priority_levels is not None:
        changes["priority_levels"] = priority_levels
        if default_priority_level is None:  # the lowest level, so unmarked requests never overtake marked ones
            changes["default_priority_level"] = priority_levels
    if default_priority_level is not None:
        changes["default_priority_level"] = default_priority_level
    queue = {k: v for k, v in dict(max_queue_size=max_queue_size, default_timeout_us=queue_timeout_us,
                                   timeout_action=timeout_action and timeout_action.upper(),
                                   allow_timeout_override=allow_timeout_override).items() if v is not None}
    if queue:
        changes["queue"] = dataclasses.replace(policy.queue, **queue)
    if priority_queue_policy:
        base = changes.get("queue", policy.queue)
        changes["priority_queues"] = tuple((level, dataclasses.replace(base, **fields))
                                           for level, fields in map(parse_priority_queue, priority_queue_policy))
    if response_cache is not None:
        changes["response_cache"] = response_cache
    if response_cache_bytes is not None:
        changes["response_cache_bytes"] = response_cache_bytes
    if model_policy:
        changes["models"] = tuple(parse_model_policy(p) for p in model_policy)
    if rate_limit_resource:
        changes["rate_limit_resources"] = tuple(parse_resource(r) for r in rate_limit_resource)
    policy = dataclasses.replace(policy, **changes)
    policy.validate(max_batch_size)
    return policy
