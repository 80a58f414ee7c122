"""The models Triton's Python backend runs, one module per model.

A generated repository carries this package (with the rest of trtbuild_runtime) in each Python
model's version folder; its `model.py` is one line that imports `TritonPythonModel` from here.
So the code Triton runs is the code the tests import: `preprocessing` and `postprocessing`
(tokenizer), `llm` (the LLM step: trtbuild_runtime or transformers' continuous batching, see
`engines` and `hf_engine`), `llmapi` (TensorRT-LLM's LLM API) and the ONNX models. `tensors` and
`tokenizer` are what they share; they import only numpy and `tokenizers`, so the text models run in
a numpy<2 environment too.
"""
