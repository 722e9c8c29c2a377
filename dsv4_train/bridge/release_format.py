"""DeepSeek's release weight format: FP8 block-scaled linears and MXFP4 routed experts, dequantised.

Written by hand: neither Megatron-Core nor transformers' loading path is available as a library
function for this layout. The rules (the release's own `inference/convert.py` and `kernel.py`):

* FP8 (`float8_e4m3fn`) weight `[out, in]` with `<name>.scale` `[ceil(out/B), ceil(in/B)]` (F32 or
  E8M0), B = `quantization_config.weight_block_size` (128 in V4): W[i, j] = Q[i, j] * S[i // B, j // B];
  edge tiles cover only the remaining rows/columns. The scale is a multiplier (`weight_scale_inv`, the
  V3 name, means the same).
* MXFP4 (`int8`, packed) weight `[out, in/2]` with an E8M0 `<name>.scale` `[out, in/32]`: byte k of a
  row holds elements 2k (low nibble) and 2k+1 (high nibble); E2M1 codes 0..7 are 0, .5, 1, 1.5, 2, 3,
  4, 6 and 8..15 their negatives; W[i, j] = E2M1(code) * 2^(S_byte[i, j // 32] - 127).
* E8M0 bytes decode to 2^(b - 127) (255 is NaN), read from the bytes, never by a value cast.

Which rule applies is decided per tensor by its dtype and checked against its scale's shape, never
by the tensor's name (an FP4 expert run through the FP8 rule would lose half its values).
"""

from __future__ import annotations

from typing import Dict, List

import torch

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)
FP4_GROUP = 32
SCALE_SUFFIXES = (".scale", ".weight_scale_inv")


def decode_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 scale bytes (a float8_e8m0fnu or uint8 tensor) -> float32 powers of two (255 -> NaN)."""
    raw = scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale
    values = torch.exp2(raw.to(torch.float32) - 127.0)
    return torch.where(raw == 255, torch.full_like(values, float("nan")), values)


def _scale_values(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype in (getattr(torch, "float8_e8m0fnu", None), torch.uint8):
        return decode_e8m0(scale)
    return scale.to(torch.float32)


def scaled_kind(name: str, weight_dtype: torch.dtype, weight_shape, scale_dtype: torch.dtype, scale_shape, *,
                block: int) -> str:
    """"fp8" or "fp4" for a weight that has a block scale, decided by its dtype and checked against the
    scale's dtype and shape (metadata only, so a conversion can check every tensor before writing)."""
    weight_shape, scale_shape = tuple(weight_shape), tuple(scale_shape)
    if weight_dtype == torch.float8_e4m3fn:
        out_dim, in_dim = weight_shape
        expected = (-(-out_dim // block), -(-in_dim // block))
        if scale_shape != expected:
            raise ValueError(f"tensor {name}: FP8 weight {list(weight_shape)} with block {block} needs a scale of shape "
                             f"{list(expected)}, the checkpoint has {list(scale_shape)}.")
        return "fp8"
    if weight_dtype in (torch.int8, torch.uint8):
        out_dim, half = weight_shape
        in_dim = 2 * half
        expected = (out_dim, in_dim // FP4_GROUP)
        if in_dim % FP4_GROUP or scale_shape != expected:
            raise ValueError(f"tensor {name}: packed FP4 weight {list(weight_shape)} (logical [{out_dim}, {in_dim}]) "
                             f"needs an E8M0 scale of shape {list(expected)}, the checkpoint has {list(scale_shape)}.")
        if scale_dtype not in (getattr(torch, "float8_e8m0fnu", None), torch.uint8):
            raise ValueError(f"tensor {name}: FP4 block scales must be E8M0, the checkpoint has {scale_dtype}.")
        return "fp4"
    raise ValueError(f"tensor {name} has a block scale but dtype {weight_dtype}; the release format "
                     "has FP8 (float8_e4m3fn) weights and packed FP4 (int8) experts only.")


def logical_shape(kind: str, weight_shape) -> tuple:
    """The dequantised shape of a stored weight (packed FP4 holds two values per byte)."""
    return (weight_shape[0], 2 * weight_shape[1]) if kind == "fp4" else tuple(weight_shape)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, *, block: int, name: str) -> torch.Tensor:
    scaled_kind(name, weight.dtype, weight.shape, scale.dtype, scale.shape, block=block)
    out_dim, in_dim = weight.shape
    factors = _scale_values(scale)
    factors = factors.repeat_interleave(block, 0)[:out_dim].repeat_interleave(block, 1)[:, :in_dim]
    return weight.to(torch.float32) * factors


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, *, name: str) -> torch.Tensor:
    scaled_kind(name, packed.dtype, packed.shape, scale.dtype, scale.shape, block=0)
    out_dim, half = packed.shape
    in_dim = 2 * half
    codes = packed.view(torch.uint8).to(torch.int64)
    low, high = codes & 0x0F, (codes >> 4) & 0x0F
    values = E2M1_VALUES[torch.stack((low, high), dim=-1).reshape(out_dim, in_dim)]
    return values * decode_e8m0(scale).repeat_interleave(FP4_GROUP, 1)


def dequantize_one(weight: torch.Tensor, scale: torch.Tensor, *, block: int, name: str) -> torch.Tensor:
    """One stored weight and its scale -> float32 (the rule picked by the weight's dtype)."""
    kind = scaled_kind(name, weight.dtype, weight.shape, scale.dtype, scale.shape, block=block)
    if kind == "fp8":
        return dequantize_fp8(weight, scale, block=block, name=name)
    return dequantize_fp4(weight, scale, name=name)


def scale_pairs(names) -> Dict[str, str]:
    """{scale tensor name: its weight's name} for every block-scale tensor among `names`."""
    return {n: n[: -len(s)] + ".weight" for n in names for s in SCALE_SUFFIXES if n.endswith(s)}


def is_quantized_dtype(name: str, dtype: torch.dtype) -> bool:
    """A stored dtype that needs a scale (hash tables are int64 data, never quantised)."""
    return dtype == torch.float8_e4m3fn or (dtype in (torch.int8, torch.uint8) and not name.endswith("tid2eid"))


def dequantize(tensors: Dict[str, torch.Tensor], *, block: int) -> tuple:
    """(tensors with every quantised weight dequantised to float32 and no scale tensors left,
    report {"fp8": [...], "fp4": [...]} of the names dequantised). Raises ValueError naming the tensor
    for a scale without weight, a quantised weight without scale, an unknown quantised dtype or a
    scale of the wrong shape."""
    out = dict(tensors)
    report: Dict[str, List[str]] = {"fp8": [], "fp4": []}
    for scale_name, weight_name in scale_pairs(tensors).items():
        if weight_name not in tensors:
            raise ValueError(f"tensor {scale_name}: a block scale without its weight {weight_name}.")
        weight, scale = tensors[weight_name], out.pop(scale_name)
        out[weight_name] = dequantize_one(weight, scale, block=block, name=weight_name)
        report["fp8" if weight.dtype == torch.float8_e4m3fn else "fp4"].append(weight_name)
    unscaled = sorted(n for n, t in out.items() if is_quantized_dtype(n, t.dtype))
    if unscaled:
        raise ValueError(f"tensor {unscaled[0]} is quantised ({out[unscaled[0]].dtype}) but has no .scale tensor; "
                         "the checkpoint is incomplete.")
    return out, report


# --- the inverse: re-quantisation for export ----------------------------------------------------
FP8_MAX = 448.0
FP4_MAX = 6.0
AMAX_FLOOR = 1e-4  # the release kernels' floor for an all-zero block


def _power_of_two_scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    """Exponent e of the scale 2^e = 2^ceil(log2(amax / top)) (the release's `ue8m0` rounding)."""
    return torch.ceil(torch.log2(amax.clamp(min=AMAX_FLOOR) / top)).to(torch.int32)


def _prefer_reference(exponents: torch.Tensor, reference, amax: torch.Tensor, top: float, exact_at) -> torch.Tensor:
    """Where a reference scale (the source checkpoint's, same block) still encodes the block exactly
    and in range, keep it. Dequantised values alone cannot tell 2^e with a largest code of 448 (FP4: 6)
    from 2^(e+1) with 224 (FP4: 3, originals that rounded down), so byte-exact re-export of unchanged
    weights needs the source's scales; changed blocks get the plain rule."""
    if reference is None:
        return exponents
    reference = reference.to(torch.int32)
    fits = amax <= top * torch.exp2(reference.to(torch.float32))
    return torch.where(fits & exact_at(reference), reference, exponents)


def scale_exponents(scale: torch.Tensor) -> torch.Tensor:
    """Exponents of a stored power-of-two scale (E8M0 bytes or float32), for `reference=`."""
    if scale.dtype in (getattr(torch, "float8_e8m0fnu", None), torch.uint8):
        return scale.view(torch.uint8).to(torch.int32) - 127
    return torch.round(torch.log2(scale.float())).to(torch.int32)


def encode_e8m0(exponents: torch.Tensor) -> torch.Tensor:
    return (exponents + 127).clamp(0, 254).to(torch.uint8).view(torch.float8_e8m0fnu)


def quantize_fp8(weight: torch.Tensor, *, block: int, scale_format: str = "ue8m0", reference=None) -> tuple:
    """W [out, in] -> (float8_e4m3fn Q, scale [ceil(out/B), ceil(in/B)] as E8M0 or float32), the
    inverse of `dequantize_fp8` with power-of-two scales; `reference`: exponents to keep where exact."""
    out_dim, in_dim = weight.shape
    rows, cols = -(-out_dim // block), -(-in_dim // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32)
    padded[:out_dim, :in_dim] = weight.float()
    tiles = padded.reshape(rows, block, cols, block).permute(0, 2, 1, 3)  # [rows, cols, B, B]
    amax = tiles.abs().amax(dim=(-1, -2))
    exponents = _power_of_two_scale(amax, FP8_MAX)

    def exact_at(exps):
        scaled = tiles / torch.exp2(exps.to(torch.float32))[..., None, None]
        return (scaled.to(torch.float8_e4m3fn).float() == scaled).all(dim=-1).all(dim=-1)

    exponents = _prefer_reference(exponents, reference, amax, FP8_MAX, exact_at)
    factors = torch.exp2(exponents.to(torch.float32))
    expanded = factors.repeat_interleave(block, 0)[:out_dim].repeat_interleave(block, 1)[:, :in_dim]
    quantized = (weight.float() / expanded).to(torch.float8_e4m3fn)
    if scale_format == "ue8m0":
        return quantized, encode_e8m0(exponents)
    if scale_format == "f32":
        return quantized, factors
    raise ValueError(f"FP8 scale format {scale_format!r}: use 'ue8m0' or 'f32'.")


def _e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (ties to the even code, as a hardware round-to-nearest-even does)."""
    grid = E2M1_VALUES[:8]
    distance = (scaled.abs().unsqueeze(-1) - grid).abs()
    code = torch.argmin(distance + 1e-6 * (torch.arange(8) % 2), dim=-1)
    return code + 8 * ((scaled < 0) & (code > 0))


def quantize_fp4(weight: torch.Tensor, *, reference=None) -> tuple:
    """W [out, in] -> (packed int8 [out, in/2], E8M0 scale [out, in/32]): the inverse of `dequantize_fp4`;
    `reference`: exponents to keep where exact."""
    out_dim, in_dim = weight.shape
    if in_dim % FP4_GROUP:
        raise ValueError(f"MXFP4 needs an input dimension divisible by {FP4_GROUP}, the weight is {list(weight.shape)}.")
    groups = weight.float().reshape(out_dim, in_dim // FP4_GROUP, FP4_GROUP)
    amax = groups.abs().amax(-1)
    exponents = _power_of_two_scale(amax, FP4_MAX)

    def exact_at(exps):
        scaled = groups / torch.exp2(exps.to(torch.float32)).unsqueeze(-1)
        return (E2M1_VALUES[_e2m1_codes(scaled)] == scaled).all(dim=-1)

    exponents = _prefer_reference(exponents, reference, amax, FP4_MAX, exact_at)
    code = _e2m1_codes(groups / torch.exp2(exponents.to(torch.float32)).unsqueeze(-1))
    code = code.reshape(out_dim, in_dim).to(torch.uint8)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8)
    return packed, encode_e8m0(exponents)
