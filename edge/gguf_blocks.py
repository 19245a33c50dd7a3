"""GGUF quantized blocks -> MatMulNBits blocks, value for value (no re-quantization).

Numpy only: the exporter converts with it, and the runtime expands a compact folder's stored GGUF rows with the
same code at load (edge/expand.py), so both produce the same bytes.

MatMulNBits computes w = scale_b * (q - 2^(bits-1)) per block b of 16-256 weights, q of 2, 4 or 8 bits; the
builder adds `mins_b` per block with one small MatMul over the input's block sums (export/builder.py). Every
GGUF type whose weights are an integer times a per-block scale, plus a per-block offset, fits that exactly:

| GGUF   | its weights                                  | here (bits, block) | scale, min (fp32)        |
|--------|----------------------------------------------|--------------------|--------------------------|
| Q4_0   | d * (q - 8), q 0..15                         | 4, 32              | d                        |
| Q4_1   | d * q + m                                    | 4, 32              | d, m + 8d                |
| Q5_0   | d * (q - 16), q 0..31                        | 8, 32              | d                        |
| Q5_1   | d * q + m                                    | 8, 32              | d, m + 16d               |
| Q8_0   | d * q, q int8                                | 8, 32              | d                        |
| Q2_K   | d*sc * q - dmin*m per 16, q 0..3             | 4, 16              | d*sc, 2 d*sc - dmin*m    |
| Q3_K   | d*(sc-32) * q per 16, q -4..3                | 4, 16              | d*(sc-32)                |
| Q4_K   | d*sc * q - dmin*m per 32, q 0..15            | 4, 32              | d*sc, 8 d*sc - dmin*m    |
| Q5_K   | d*sc * q - dmin*m per 32, q 0..31            | 8, 32              | d*sc, 16 d*sc - dmin*m   |
| Q6_K   | d*sc * (q - 32) per 16, q 0..63              | 8, 16              | d*sc                     |
| IQ4_NL | d * kvalues[q] (an int8 codebook)            | 8, 32              | d                        |
| IQ4_XS | d*(ls-32) * kvalues[q] per 32                | 8, 32              | d*(ls-32)                |

The 5- and 6-bit types and the IQ4 codebook go to 8 bits (onnxruntime's CPU MatMulNBits has 2, 4 and 8 bits);
2- and 3-bit ones to 4 bits. Products of an fp16 super-block scale and a 4-8 bit sub-block scale need up to 19
significant bits: exact in fp32, not in fp16, so those scales stay fp32. Types with a minimum keep their integers centred
on the zero point (q - 8, q - 16, q - 2) and fold the shift into the offset (m + 16d, 8 d*sc - dmin*m, …): at
accuracy level 4 onnxruntime quantizes the activations to int8, and that error is multiplied by the integers'
mean, so uncentred 0..31 integers cost agreement (Q5_K_M SmolLM2: 92.1 % uncentred). The fp32 sum in the
offset is the only rounding: half an ulp of the offset, as in the fp32 arithmetic of gguf's own `dequantize`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

EXACT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
SUPER_BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "IQ4_XS": 136}  # per 256
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int16)
_IQ4_STORED = (IQ4_NL_VALUES + 128).astype(np.uint8)  # on the 8-bit zero point


class Blocks(NamedTuple):
    """A weight [N, K] in MatMulNBits layout: w = scales[n, b] * (q - 2^(bits-1)) (+ mins[n, b])."""

    bits: int
    block_size: int
    packed: np.ndarray  # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray  # float32 [N, K/block]
    mins: np.ndarray | None  # float32 [N, K/block]


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """MatMulNBits 4-bit packing: byte j holds element 2j (low nibble) and 2j+1 (high)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins -> ([..., 8], [..., 8]) (llama.cpp's get_scale_min_k4)."""
    d, m, m_d = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _f16(b: np.ndarray) -> np.ndarray:
    """fp16 fields (uint8 [..., 2]) as float32 [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _bits(x: np.ndarray, shifts, mask: int) -> np.ndarray:
    """Unpack bit fields: x [..., n] -> [..., len(shifts), n], field i = (x >> shifts[i]) & mask."""
    s = np.asarray(shifts, dtype=x.dtype).reshape(-1, 1)
    return (x[..., None, :] >> s) & x.dtype.type(mask)


def _blocks(bits: int, block: int, q: np.ndarray, scales: np.ndarray, mins: np.ndarray | None) -> Blocks:
    """q: uint8 [N, K] already offset to MatMulNBits' symmetric zero point (0..2^bits-1). The integer work stays in
    uint8 (every offset integer fits): wider temporaries made a device's first load of a compact folder ~2x slower."""
    n, k = q.shape
    q = q.reshape(n, k // block, block)
    packed = pack_nibbles(q) if bits == 4 else q
    return Blocks(bits, block, np.ascontiguousarray(packed), np.ascontiguousarray(scales, dtype=np.float32),
                  None if mins is None else np.ascontiguousarray(mins, dtype=np.float32))


def gguf_blocks(kind: str, raw: np.ndarray) -> Blocks:
    """GGUF block rows (uint8 [N, bytes per row]) of type `kind` as MatMulNBits blocks, bit for bit."""
    n = raw.shape[0]
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"):
        size = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "IQ4_NL": 18}[kind]
        b = raw.reshape(n, -1, size)
        d = _f16(b[..., :2])
        if kind == "Q8_0":  # w = d*q, q int8: q + 128 is its two's complement with the top bit flipped
            return _blocks(8, 32, (b[..., 2:] ^ np.uint8(0x80)).reshape(n, -1), d, None)
        qs = b[..., size - 16:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # low nibbles: elements 0..15, high: 16..31
        if kind == "IQ4_NL":  # w = d * kvalues[q]
            return _blocks(8, 32, _IQ4_STORED[q].reshape(n, -1), d, None)
        if kind in ("Q5_0", "Q5_1"):  # the fifth bit of element i is bit i of a little-endian uint32
            qh = np.ascontiguousarray(b[..., size - 20:size - 16]).view("<u4")
            q |= ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << np.uint8(4)
        if kind == "Q4_0":  # w = d*(q - 8)
            return _blocks(4, 32, q.reshape(n, -1), d, None)
        if kind == "Q5_0":  # w = d*(q - 16)
            return _blocks(8, 32, (q + np.uint8(112)).reshape(n, -1), d, None)
        m = _f16(b[..., 2:4])
        if kind == "Q4_1":  # w = d*q + m = d*(q - 8) + (m + 8d)
            return _blocks(4, 32, q.reshape(n, -1), d, m + 8 * d)
        return _blocks(8, 32, (q + np.uint8(112)).reshape(n, -1), d, m + 16 * d)  # Q5_1: w = d*(q - 16) + (m + 16d)

    b = raw.reshape(n, -1, SUPER_BLOCK_BYTES[kind])
    nb = b.shape[1]  # super-blocks of 256 per row
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, m = _scale_min_k4(b[..., 4:16])
        scale = d * sc.reshape(n, nb, 8).astype(np.float32)  # [n, nb, 8]: one per 32 weights
        offset = dmin * m.reshape(n, nb, 8).astype(np.float32)
        qs = b[..., 16:144] if kind == "Q4_K" else b[..., 48:176]
        q = _bits(qs.reshape(n, nb, 4, 32), (0, 4), 0x0F).reshape(n, nb, 8, 32)
        if kind == "Q4_K":  # w = s*q - o = s*(q - 8) + (8s - o)
            return _blocks(4, 32, q.reshape(n, -1), scale.reshape(n, -1), (8 * scale - offset).reshape(n, -1))
        qh = _bits(b[..., 16:48], range(8), 1)  # [n, nb, 8, 32]: bit j of byte i -> sub-block j
        q |= qh << np.uint8(4)  # w = s*q - o = s*(q - 16) + (16s - o)
        return _blocks(8, 32, (q + np.uint8(112)).reshape(n, -1), scale.reshape(n, -1), (16 * scale - offset).reshape(n, -1))
    if kind == "Q6_K":  # ql[128] qh[64] scales int8[16] d
        ql = _bits(b[..., 0:128].reshape(n, nb, 2, 64), (0, 4), 0x0F).reshape(n, nb, 2, 2, 2, 32)
        qh = _bits(b[..., 128:192].reshape(n, nb, 2, 32), (0, 2, 4, 6), 3).reshape(n, nb, 2, 2, 2, 32)
        q = (ql | (qh << np.uint8(4))).reshape(n, nb, 256)
        scale = _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)
        return _blocks(8, 16, (q + np.uint8(96)).reshape(n, -1), scale.reshape(n, -1), None)  # q-32 -> zero point 128
    if kind == "Q3_K":  # hmask[32] qs[64] scales[12] d
        lo = _bits(b[..., 96:104], (0, 4), 0x0F).reshape(n, nb, 16)
        hi = _bits(b[..., 104:108], (0, 2, 4, 6), 3).reshape(n, nb, 16)
        scale = _f16(b[..., 108:110])[..., None] * ((lo | (hi << 4)).astype(np.float32) - 32)
        ql = _bits(b[..., 32:96].reshape(n, nb, 2, 32), (0, 2, 4, 6), 3).reshape(n, nb, 256)
        qh = _bits(b[..., 0:32], range(8), 1).reshape(n, nb, 256)
        q = ql + (qh << np.uint8(2)) + np.uint8(4)  # (ql - 4 + 4 qh: -4..3, the high bit set means no offset) + 8
        return _blocks(4, 16, q.reshape(n, -1), scale.reshape(n, -1), None)
    if kind == "Q2_K":  # scales[16] qs[64] d dmin
        sc = b[..., 0:16]
        d, dmin = _f16(b[..., 80:82])[..., None], _f16(b[..., 82:84])[..., None]
        scale, offset = d * (sc & 0x0F).astype(np.float32), dmin * (sc >> 4).astype(np.float32)
        q = _bits(b[..., 16:80].reshape(n, nb, 2, 32), (0, 2, 4, 6), 3).reshape(n, nb, 256)
        # w = s*q - o = s*(q - 2) + (2s - o)
        return _blocks(4, 16, (q + np.uint8(6)).reshape(n, -1), scale.reshape(n, -1), (2 * scale - offset).reshape(n, -1))
    if kind == "IQ4_XS":  # d scales_h:u16 scales_l[4] qs[128]
        d = _f16(b[..., 0:2])[..., None]
        sh = np.ascontiguousarray(b[..., 2:4]).view("<u2")  # [n, nb, 1]
        sl = _bits(b[..., 4:8], (0, 4), 0x0F).transpose(0, 1, 3, 2).reshape(n, nb, 8)
        hi = ((sh >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.uint8)
        scale = d * ((sl | (hi << 4)).astype(np.float32) - 32)
        q = _bits(b[..., 8:136].reshape(n, nb, 8, 16), (0, 4), 0x0F).reshape(n, nb, 8, 32)
        return _blocks(8, 32, _IQ4_STORED[q].reshape(n, -1), scale.reshape(n, -1), None)
    raise ValueError(f"no exact import for GGUF {kind}")
