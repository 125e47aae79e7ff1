"""Integer codes of RoSTE's fake-quantized weights, and their packing (METHODS.md §4).

A fake-quantized row is ``(c - z) s`` with integer codes ``c`` in [0, 2^b - 1]
(asymmetric) or [-2^(b-1), 2^(b-1) - 1] (symmetric, stored shifted by 2^(b-1)
with z = 2^(b-1)), one scale ``s`` and zero point ``z`` per output channel,
computed as fastft.ops.fake_quant computes them. ``codes`` recovers ``c`` from
the fake-quantized fp32 values themselves and checks that ``(c - z) s`` gives
them back bit for bit, so a file dequantizes to exactly the weights the model
ran. Storage: 2..4 bits two codes per byte (the even column in the low nibble),
5..8 bits one uint8 per code.
"""

from __future__ import annotations

import torch

from ..errors import FastftError
from ..ops.fake_quant import row_qparams


def qparams(w: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float):
    """(scale, zero) per row of a fp32 [out, in] weight, each [out, 1] fp32; symmetric codes
    are stored shifted, so their zero is 2^(b-1)."""
    s, z = row_qparams(w, bits, symmetric, clip_ratio)
    return (s, torch.full_like(s, float(2 ** (bits - 1)))) if symmetric else (s, z)


def codes(w: torch.Tensor, wq: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float,
          name: str = "weight"):
    """(uint8 codes [out, in], scale [out], zero [out]) such that (codes - zero) * scale is
    ``wq`` exactly; ``w`` the fp32 weight that was quantized, ``wq`` its fake-quantized fp32
    value."""
    s, z = qparams(w.float(), bits, symmetric, clip_ratio)
    c = torch.round(wq.float() / s) + z
    hi = 2**bits - 1
    if (c < 0).any() or (c > hi).any() or not torch.equal(dequantize(c.to(torch.uint8),
                                                                     s.flatten(), z.flatten()),
                                                          wq.float()):
        raise FastftError(f"export: the fake-quantized {name} is not (c - z) s with {bits}-bit "
                          "codes and the per-channel scale of METHODS §4 (a quantizer backend "
                          "computed its scale differently); export with FASTFT_BACKEND=torch")
    return c.to(torch.uint8), s.flatten(), z.flatten()


def dequantize(c: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(c - z) s in fp32, per row."""
    return (c.float() - zero[:, None]) * scale[:, None]


def pack(c: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [out, in] -> [out, ceil(in / 2)] for bits <= 4, else unchanged."""
    if bits > 4:
        return c.contiguous()
    if c.shape[1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack(p: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    if bits > 4:
        return p
    out = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)
    return out[:, :in_features]
