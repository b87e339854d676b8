"""edgeprune: compress Hugging Face transformers into deployable, measured ONNX artifacts."""

__version__ = "0.1.0"
