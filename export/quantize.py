"""Weight quantization for MatMulNBits, by onnxruntime's own block-wise quantizers.

GGUF blocks arrive already quantized (see sources.py) and pass through untouched; float weights go
through `quantize_weight` with one of onnxruntime's methods:

- rtn:      round to nearest, symmetric (the default: ARM's KleidiAI kernels need symmetric blocks, and
            onnxruntime's x86 int8 kernels are fastest without zero points)
- rtn-asym: round to nearest with a 4-bit zero point per block
- k_quant:  llama.cpp's k-quant search for scale and minimum (onnxruntime's port), zero point per block
- hqq:      half-quadratic quantization (onnxruntime's HQQ quantizer); its float zero points are
            rounded to 4-bit ones, because MatMulNBits with float zero points takes a slow path
"""

from __future__ import annotations

import numpy as np
from nomoat.edge.gguf_blocks import pack_nibbles

from .sources import QuantBlocks, unpack_nibbles

METHODS = ("rtn", "rtn-asym", "k_quant", "hqq")


def quantize_weight(weight: np.ndarray, bits: int = 4, block_size: int = 32, method: str = "rtn") -> QuantBlocks:
    """Quantize a float weight [N, K] (PyTorch Linear layout) into MatMulNBits blocks."""
    n, k = weight.shape
    if k % block_size:
        raise ValueError(f"input dimension {k} is not a multiple of block size {block_size}")
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose from {', '.join(METHODS)}")
    weight = np.ascontiguousarray(weight, np.float32)
    nb = k // block_size
    if method in ("rtn", "rtn-asym") or bits != 4:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        symmetric = method == "rtn" or bits != 4
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
        # onnxruntime quantizes B of x @ B, i.e. [K, N]
        packed, scales, zp = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(weight.T))
        zero_points = None if symmetric else _unpack_zero_points(zp, n, nb)
        return QuantBlocks(bits, block_size, packed, scales.reshape(n, nb).astype(np.float32), zero_points,
                           kind=f"{method}-int{bits}")
    if method == "k_quant":
        from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

        q, scales, zp = quant_tensor_k_quant_cpu(weight, bits, block_size)  # groups along K of each row
    else:
        import torch
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            HQQWeightOnlyQuantConfig,
            HQQWeightOnlyQuantizer,
        )

        hqq = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
        _, scales_t, zero_t = hqq.quantize_internal(torch.from_numpy(weight), bits=bits, group_size=block_size)
        scales = scales_t.numpy().reshape(-1, 1).astype(np.float64)
        zp = np.clip(np.round(zero_t.numpy().reshape(-1, 1)), 0, 15)
        q = np.clip(np.round(weight.reshape(-1, block_size) / scales + zp), 0, 15)
    q = q.reshape(n, nb, block_size).astype(np.uint8)
    return QuantBlocks(bits, block_size, pack_nibbles(q), scales.reshape(n, nb).astype(np.float32),
                       zp.reshape(n, nb).astype(np.uint8), kind=f"{method}-int{bits}")


def _unpack_zero_points(zp: np.ndarray, n: int, nb: int) -> np.ndarray:
    """onnxruntime packs two 4-bit zero points per byte, rows padded to whole bytes."""
    return unpack_nibbles(zp.reshape(n, -1))[:, :nb]


def pack_zero_points(zero_points: np.ndarray) -> np.ndarray:
    """[N, blocks] uint8 -> MatMulNBits' zero_points input (4-bit, two per byte, rows padded)."""
    n, nb = zero_points.shape
    padded = np.zeros((n, nb + nb % 2), np.uint8)
    padded[:, :nb] = zero_points
    return pack_nibbles(padded).reshape(-1)


def max_error(weight: np.ndarray, blocks: QuantBlocks) -> float:
    """Largest absolute difference between a weight and its quantized form (self-check)."""
    return float(np.abs(blocks.dequantize() - weight).max())
