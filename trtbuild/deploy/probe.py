"""The health probe of a deployment: a real one-token generate with a timeout.

Triton answers /v2/health/ready as long as its models are loaded, also when an LLM engine behind
one is wedged; a generate proves the whole path. Compose's healthcheck and Kubernetes' readiness and
liveness probes run this in the serving container (its python3), against the text model or the
ensemble, without streaming (one response).
"""

from __future__ import annotations

PROBE_TIMEOUT_S = 10  # a one-token generate takes milliseconds; seconds mean a queue or a wedge

_SCRIPT = (
    "import json,sys,urllib.request as u;"
    "r=u.Request(sys.argv[1],json.dumps({'text_input':'ping','max_tokens':1,'stream':False}).encode(),"
    "{'Content-Type':'application/json'});"
    "b=json.load(u.urlopen(r,timeout=float(sys.argv[2])));"
    "sys.exit(0 if 'text_output' in b and 'error' not in b else 1)"
)


def generate_probe(model: str, http_port: int, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[str, ...]:
    """argv that exits 0 only if `model` answers a one-token generate within `timeout_s`."""
    return ("python3", "-c", _SCRIPT, f"http://localhost:{http_port}/v2/models/{model}/generate", str(timeout_s))


def probe_model(manifest: dict) -> str:
    """The model the probe asks: the text model where the repository has one, else the ensemble."""
    entrypoints = manifest.get("entrypoints") or {}
    return entrypoints.get("text") or entrypoints.get("ensemble") or "ensemble"
