"""Device side of nomoat: runs exported models with onnxruntime + numpy. Never imports torch."""

__version__ = "0.1.0"
