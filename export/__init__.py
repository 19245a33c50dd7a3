"""Host side of nomoat: LLaMA checkpoints (+ LoRA) to int4 ONNX model folders. Needs torch/onnx extras."""

__version__ = "0.1.0"
