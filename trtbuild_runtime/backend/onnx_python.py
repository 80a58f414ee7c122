"""An ONNX model run by ONNX Runtime inside Triton's Python backend.

The `onnxruntime-python` runtime: it serves the same tensors as Triton's ONNX Runtime backend on a
server that has only the Python backend. Triton's dynamic batcher hands over several requests at
once; requests whose tensors agree in every axis but the first are concatenated and run as one batch.
"""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild_runtime.backend.tensors import error_response, parameters, tensor


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        _, params = parameters(args)
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        if path.is_dir():  # a model with external data is a folder holding model.onnx and its weights
            path = path / "model.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", "0"))
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args.get("model_instance_device_id", 0))}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for index, request in enumerate(requests):
            feeds = {}
            for name in self.inputs:
                t = pb_utils.get_input_tensor_by_name(request, name)
                if t is None:
                    responses[index] = error_response(f"input '{name}' is missing")
                    break
                feeds[name] = t.as_numpy()
            else:
                key = tuple((name, feeds[name].shape[1:], feeds[name].dtype.str) for name in self.inputs)
                groups.setdefault(key, []).append((index, feeds))
        for items in groups.values():
            sizes = [feeds[self.inputs[0]].shape[0] for _, feeds in items]
            batch = {n: np.concatenate([feeds[n] for _, feeds in items]) for n in self.inputs}
            try:
                results = self.session.run(self.outputs, batch)
            except Exception as e:  # noqa: BLE001 - ORT's errors go back to the client
                for index, _ in items:
                    responses[index] = error_response(f"onnxruntime: {e}")
                continue
            bounds = np.cumsum([0, *sizes])
            for (index, _), start, end in zip(items, bounds[:-1], bounds[1:]):
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[tensor(name, out[start:end]) for name, out in zip(self.outputs, results)]
                )
        return responses
