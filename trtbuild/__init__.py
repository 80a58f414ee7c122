"""trtbuild: turn a Hugging Face checkpoint into a Triton Inference Server deployment."""

__version__ = "0.1.0"
