"""How the benchmark talks to Triton: gRPC (tritonclient.grpc.aio) and HTTP (trtbuild.clients.http1).

gRPC opens one bidirectional stream per request for decoupled models: the stream closes once the
server has sent everything, which marks the end of the request whether or not the model sends an
empty final response (the asyncio client cannot ask for one). Other models get unary ModelInfer.
HTTP goes to Triton's `/generate` and `/generate_stream` (server-sent events) endpoints, and to
KServe `/infer` for tensor models. During the timed loop a transport only time-stamps and keeps
what arrives; `decode` turns it into text, token counts and errors after the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np

from trtbuild.errors import TrtbuildError
from trtbuild.bench.metrics import RequestRecord
from trtbuild.clients.target import ModelInterface, triton_dtype


class GrpcTransport:
    """tritonclient.grpc.aio; one stream per request for decoupled models."""

    def __init__(self, url: str, timeout: float):
        self.url = url
        self.timeout = timeout
        self.client = None

    async def open(self) -> None:
        import tritonclient.grpc.aio as grpcaio

        self.client = grpcaio.InferenceServerClient(self.url)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def server_metadata(self) -> dict:
        return await self.client.get_server_metadata(as_json=True, client_timeout=10)

    async def server_ready(self) -> bool:
        return bool(await self.client.is_server_ready(client_timeout=10))

    async def model_metadata(self, model: str) -> dict:
        return await self.client.get_model_metadata(model, as_json=True, client_timeout=10)

    async def model_config(self, model: str) -> dict:
        return (await self.client.get_model_config(model, as_json=True, client_timeout=10))["config"]

    async def models(self) -> list[str]:
        index = await self.client.get_model_repository_index(as_json=True, client_timeout=10)
        return [m["name"] for m in index.get("models", [])]

    async def model_stats(self, model: str) -> dict:
        return await self.client.get_inference_statistics(model, as_json=True, client_timeout=10)

    def prepare(self, iface: ModelInterface, arrays: dict[str, np.ndarray], request_id: str = "") -> dict:
        import tritonclient.grpc as grpcclient

        inputs = []
        for name, array in arrays.items():
            t = grpcclient.InferInput(name, list(array.shape), triton_dtype(array))
            t.set_data_from_numpy(array)
            inputs.append(t)
        outputs = None
        if iface.is_llm:
            outputs = [grpcclient.InferRequestedOutput(n) for n in ("text_output", *iface.count_outputs)]
        return {"model_name": iface.name, "inputs": inputs, "outputs": outputs, "request_id": request_id}

    async def send(self, iface: ModelInterface, request: dict, record: RequestRecord) -> None:
        try:
            if iface.decoupled:
                await self._stream(iface, request, record)
            else:
                result = await self.client.infer(
                    request["model_name"], request["inputs"], outputs=request["outputs"],
                    request_id=request["request_id"], client_timeout=self.timeout,
                )
                self._keep(iface, result, time.perf_counter(), record)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - connection loss, timeouts, server errors: all recorded
            record.error = record.error or one_line(e)
        record.end = time.perf_counter()

    async def _stream(self, iface: ModelInterface, request: dict, record: RequestRecord) -> None:
        async def single():
            yield request

        responses = self.client.stream_infer(single(), stream_timeout=self.timeout)
        try:
            async for result, error in responses:
                arrived = time.perf_counter()
                if error is not None:
                    record.error = one_line(error)
                    break
                self._keep(iface, result, arrived, record)
        finally:
            if record.error is not None:
                responses.cancel()

    @staticmethod
    def _keep(iface: ModelInterface, result, arrived: float, record: RequestRecord) -> None:
        """Only what decides whether the response carried output; decoding waits for the end."""
        if not iface.is_llm:
            record.arrivals.append(arrived)
            return
        response = result.get_response()
        if not response.outputs:
            return  # an empty final response
        record.raw.append(response)
        if not response.raw_output_contents:  # outputs in typed fields instead of raw bytes: count the response
            record.arrivals.append(arrived)
            return
        for output, content in zip(response.outputs, response.raw_output_contents):
            # BYTES elements carry a 4-byte length prefix; INT32 counts are 4 little-endian bytes
            if (output.name == "text_output" and len(content) > 4) or (
                    output.name == "num_output_tokens" and int.from_bytes(content[:4], "little") > 0):
                record.arrivals.append(arrived)
                break

    @staticmethod
    def decode(iface: ModelInterface, record: RequestRecord) -> dict[str, int]:
        if not iface.is_llm:
            return {}
        import tritonclient.grpc as grpcclient

        pieces, counts = [], []
        for response in record.raw:
            result = grpcclient.InferResult(response)
            text = result.as_numpy("text_output")
            pieces.append(b"".join(v if isinstance(v, bytes) else str(v).encode() for v in text.reshape(-1)) if text is not None else b"")
            arrays = {o: result.as_numpy(o) for o in iface.count_outputs}
            counts.append({k: int(v.reshape(-1)[0]) for k, v in arrays.items() if v is not None and v.size})
        record.text = b"".join(pieces).decode("utf-8", errors="replace")
        return _sum_counts(counts)


class HttpTransport:
    """Triton's /generate, /generate_stream (server-sent events) and KServe /infer endpoints, over
    keep-alive connections of trtbuild.clients.http1 (aiohttp costs several times more CPU per request)."""

    def __init__(self, url: str, timeout: float, binary: bool = True):
        from trtbuild.clients.http1 import Http1Client

        try:
            self.client = Http1Client(url, timeout)
        except ValueError as e:
            raise TrtbuildError(f"--url {url}: {e}") from None
        self.binary = binary

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        self.client.close()

    async def _json(self, path: str, method: str = "GET") -> Any:
        response = await (self.client.get(path) if method == "GET" else self.client.post(path, b"{}"))
        text = response.body.decode("utf-8", errors="replace")
        if response.status != 200:
            raise TrtbuildError(_http_error(text, response.status))
        return json.loads(text)

    async def server_metadata(self) -> dict:
        return await self._json("/v2")

    async def server_ready(self) -> bool:
        return (await self.client.get("/v2/health/ready")).status == 200

    async def model_metadata(self, model: str) -> dict:
        return await self._json(f"/v2/models/{model}")

    async def model_config(self, model: str) -> dict:
        return await self._json(f"/v2/models/{model}/config")

    async def models(self) -> list[str]:
        return [m["name"] for m in await self._json("/v2/repository/index", "POST")]

    async def model_stats(self, model: str) -> dict:
        return await self._json(f"/v2/models/{model}/stats")

    def prepare(self, iface: ModelInterface, body: bytes | dict[str, np.ndarray], stream: bool, request_id: str = "") -> dict:
        if iface.is_llm:
            endpoint = "generate_stream" if stream else "generate"
            data = self.client.request_bytes("POST", f"/v2/models/{iface.name}/{endpoint}", body, {"Content-Type": "application/json"})
            return {"data": data, "body": body, "sse": stream}
        import tritonclient.http as httpclient

        inputs = []
        for name, array in body.items():
            t = httpclient.InferInput(name, list(array.shape), triton_dtype(array))
            t.set_data_from_numpy(array, binary_data=self.binary)
            inputs.append(t)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=self.binary) for n in iface.outputs]
        payload, json_size = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs, request_id=request_id)
        headers = {"Content-Type": "application/octet-stream" if json_size is not None else "application/json"}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        return {"data": self.client.request_bytes("POST", f"/v2/models/{iface.name}/infer", payload, headers), "body": payload,
                "sse": False}

    async def send(self, iface: ModelInterface, request: dict, record: RequestRecord) -> None:
        try:
            response = await self.client.request(request["data"])
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - connection loss, timeouts: recorded
            record.error = one_line(e)
            record.end = time.perf_counter()
            return
        record.end = response.completed
        if response.status != 200:
            record.error = _http_error(response.body.decode("utf-8", errors="replace"), response.status)
        elif request["sse"]:
            record.raw = response.chunks
        else:
            record.raw = [(response.completed, response.body)]

    @staticmethod
    def decode(iface: ModelInterface, record: RequestRecord) -> dict[str, int]:
        if not iface.is_llm:
            record.arrivals = [t for t, _ in record.raw]
            return {}
        pieces, counts = [], []
        for arrived, payload in _events(record.raw):
            try:
                data = json.loads(payload)
            except json.JSONDecodeError:
                record.error = record.error or f"unreadable response: {payload[:200]!r}"
                continue
            if "error" in data:
                record.error = record.error or one_line(data["error"])
                continue
            piece = data.get("text_output", "")
            piece = piece if isinstance(piece, str) else "".join(map(str, piece))
            count = {k: int(np.asarray(data[k]).reshape(-1)[0]) for k in iface.count_outputs if k in data}
            counts.append(count)
            pieces.append(piece)
            if piece or count.get("num_output_tokens", 0) > 0:
                record.arrivals.append(arrived)
        record.text = "".join(pieces)
        return _sum_counts(counts)


def _events(raw: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """JSON payloads with the arrival time of the chunk that completed them: the `data:` fields of
    server-sent events, or a whole body when the response was not an event stream."""
    if len(raw) == 1 and not raw[0][1].lstrip().startswith(b"data:"):
        return [raw[0]]
    events, pending = [], b""
    for arrived, data in raw:
        pending += data.replace(b"\r\n", b"\n")
        while (end := pending.find(b"\n\n")) >= 0:
            event, pending = pending[:end], pending[end + 2:]
            events += [(arrived, line[5:].strip()) for line in event.split(b"\n") if line.startswith(b"data:")]
    if pending.strip().startswith(b"data:"):
        events.append((raw[-1][0], pending.strip()[5:].strip()))
    return events


def _sum_counts(counts) -> dict[str, int]:
    """Per-response token counts summed over a request (streamed responses carry new tokens only)."""
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = v if k == "num_input_tokens" else total.get(k, 0) + v
    return total


def one_line(e: Any) -> str:
    """A readable single line from gRPC, tritonclient, aiohttp or server errors."""
    if callable(getattr(e, "details", None)) and callable(getattr(e, "code", None)):
        text = f"{e.code().name}: {e.details()}"
    elif callable(getattr(e, "message", None)):
        text = e.message()
    else:
        text = str(e)
    return " ".join((text or type(e).__name__).split())[:500]


def _http_error(body: str, status: int) -> str:
    try:
        return f"HTTP {status}: {json.loads(body)['error']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body.strip()[:300]}"


def make_transport(protocol: str, url: str, timeout: float, http_binary: bool = True) -> GrpcTransport | HttpTransport:
    if protocol == "grpc":
        return GrpcTransport(url, timeout)
    return HttpTransport(url, timeout, http_binary)
