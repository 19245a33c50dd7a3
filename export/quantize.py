"""Weight quantization for MatMulNBits, by onnxruntime's own block-wise quantizer.

GGUF blocks arrive already quantized (see sources.py) and pass through untouched; float
weights go through `quantize_weight` (round-to-nearest, symmetric by default because ARM's
KleidiAI kernels need symmetric blocks).
"""

from __future__ import annotations

import numpy as np

from .sources import QuantBlocks


def quantize_weight(weight: np.ndarray, bits: int = 4, block_size: int = 32) -> QuantBlocks:
    """Quantize a float weight [N, K] (PyTorch Linear layout) into symmetric MatMulNBits blocks."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    n, k = weight.shape
    if k % block_size:
        raise ValueError(f"input dimension {k} is not a multiple of block size {block_size}")
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits)
    # onnxruntime quantizes B of x @ B, i.e. [K, N]
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight.T.astype(np.float32)))
    return QuantBlocks(bits, block_size, packed, scales.reshape(n, k // block_size).astype(np.float32),
                       kind=f"rtn-int{bits}")


def max_error(weight: np.ndarray, blocks: QuantBlocks) -> float:
    """Largest absolute difference between a weight and its quantized form (self-check)."""
    return float(np.abs(blocks.dequantize() - weight).max())
