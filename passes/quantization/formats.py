"""Number formats for the ``quantize`` pass: MASE's formats and OCP MX, simulated in float.

Each ``quantize_<format>(x, **keys)`` returns a tensor of ``x``'s dtype and shape that
holds values the format represents exactly. Rounding is to nearest, ties to even, and
values past the largest one saturate. The gradient is the straight-through estimator
(the forward value is quantized, the backward pass is the identity), so fine-tuning a
quantized graph is quantization-aware training. Exact zeros stay zero in every format
except bipolar ``binary``, so pruned weights stay pruned.

Each format's keys, their checks and ``quantizer(name, prefix, entry)``, which reads
them from a MASE entry, are in ``format_specs``.

Example:
    >>> quantize_integer(torch.tensor([0.1, 100.0]), width=8, frac_width=4)  # tensor([0.1250, 7.9375])
    >>> fitting_frac_width(100.0, 8)           # tensor(0): 100 fits 8 bits at 2^-0, not at 2^-1
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _work(x: Tensor) -> Tensor:
    """``x`` without autograd, at least 1-d, in a dtype where powers of two scale it exactly."""
    v = x.detach().reshape(-1) if x.dim() == 0 else x.detach()
    return v.float() if v.dtype in (torch.float16, torch.bfloat16) else v


def _straight_through(x: Tensor, q: Tensor) -> Tensor:
    # `q + (x - x.detach())` rather than `x + (q - x).detach()`: the latter rounds when
    # |x| is far larger than q (a saturated value), this one is q exactly.
    return q.reshape(x.shape).to(x.dtype) + (x - x.detach())


def _round_float(mag: Tensor, man_bits: int, min_exp, top) -> Tensor:
    """Round magnitudes to a float grid: ``man_bits`` fraction bits, normal exponents >= min_exp
    (below it the grid stays uniform: subnormals), ties to even, saturating at ``top``.
    ``min_exp`` and ``top`` may be tensors (one per block, broadcast to ``mag``)."""
    exp = (torch.frexp(mag).exponent - 1).to(mag.dtype)  # floor(log2): frexp is exact, log2 is not
    ulp = torch.exp2(torch.clamp(exp, min=min_exp) - man_bits)
    return torch.clamp(torch.round(mag / ulp) * ulp, max=top)  # a carry into the next binade is still on the grid


def _block_log2_max(v: Tensor, size: int) -> Tensor:
    """floor(log2 max|v|) of each block of ``size`` along the last dim (the last block zero-padded), per element."""
    d = v.shape[-1]
    blocks = F.pad(v.abs(), (0, -d % size)).unflatten(-1, (-1, size))
    top = torch.frexp(blocks.amax(dim=-1)).exponent - 1  # an all-zero block gets -1; its values stay 0 anyway
    return top.repeat_interleave(size, dim=-1)[..., :d].to(v.dtype)


def _bias(exponent_width: int, exponent_bias: int | None) -> int:
    return 2 ** (exponent_width - 1) - 1 if exponent_bias is None else exponent_bias


def _per_row(v: Tensor) -> tuple[int, ...]:
    # MASE's scaled binary/ternary statistics: one per slice along dim 0 (batch item, output row)
    return tuple(range(1, v.dim())) if v.dim() > 1 else (0,)


def quantize_integer(
    x: Tensor, width: int, frac_width: int | str, floor: bool = False, per_channel: bool = False,
    range: str = "max",  # noqa: A002  (the key's name)
) -> Tensor:
    """``integer``: signed fixed point, clamp(round(x * 2^frac_width), -2^(width-1), 2^(width-1)-1) / 2^frac_width.
    Keys: width, frac_width; floor (round down instead of half to even).

    ``frac_width = "auto"`` fits the grid to the tensor: the largest frac width at which
    its max |x| (``range = "max"``) or the larger magnitude of its 0.1 and 99.9
    percentiles (``range = "percentile"``) is not saturated (:func:`fitting_frac_width`),
    computed from ``x`` on every call. The ``quantize`` pass resolves "auto" once, to a
    fixed integer, from the weight or from ``profile_statistics``; only ``per_channel``
    stays computed on the fly: one frac width per slice along dim 0 (a weight's output
    row), from that row's max |x|, so each row has its own power-of-two scale.
    """
    v = _work(x)
    if frac_width == "auto":
        if per_channel:
            f = row_frac_widths(v, width, floor).reshape(-1, *[1] * (v.dim() - 1))
        else:
            f = fitting_frac_width(tensor_range(v, range), width, floor)
        scale = torch.exp2(f.to(v.dtype))  # powers of two: exact in the working dtype
    else:
        scale = 2.0**frac_width
    scaled = v * scale
    k = torch.floor(scaled) if floor else torch.round(scaled)
    return _straight_through(x, k.clamp(-(2 ** (width - 1)), 2 ** (width - 1) - 1) / scale)


# The percentiles (in %) whose larger magnitude is a tensor's range with range = "percentile",
# unless profile_statistics recorded others.
RANGE_PERCENTILES = (0.1, 99.9)


def fitting_frac_width(maxabs: Tensor | float, width: int, floor: bool = False) -> Tensor:
    """The largest frac width f at which ``maxabs`` is not saturated on ``width``-bit signed integers.

    That is the largest f with round(maxabs * 2^f) <= 2^(width-1) - 1 (floor instead of round
    with ``floor``): f = width - 2 - floor(log2 maxabs), one less when maxabs lies in the top
    half step below 2^(floor(log2 maxabs) + 1) (it would round up to 2^(width-1)). An exact
    power of two 2^k gets width - 2 - k, not width - 1 - k (2^k itself would saturate). The
    range is symmetric (the most negative code -2^(width-1) is not counted on). Zero (an
    all-zero tensor or pruned row) gets width - 1. Element-wise over a tensor of maxima.
    """
    m = torch.as_tensor(maxabs, dtype=torch.float64)
    f = (width - 2) - (torch.frexp(m).exponent - 1)  # frexp: exact floor(log2), log2 is not
    scaled = m * torch.exp2(f.double())
    top = torch.floor(scaled) if floor else torch.round(scaled)
    f = torch.where(top > 2 ** (width - 1) - 1, f - 1, f)
    return torch.where(m > 0, f, torch.full_like(f, width - 1))


def row_frac_widths(v: Tensor, width: int, floor: bool = False) -> Tensor:
    """:func:`fitting_frac_width` of each slice along dim 0 (a weight's output row), from its max |v|."""
    rows = v.abs().reshape(v.shape[0], -1).amax(dim=1) if v.numel() else v.new_zeros(v.shape[0])
    return fitting_frac_width(rows, width, floor)


def tensor_range(v: Tensor, range: str = "max", percentiles=RANGE_PERCENTILES) -> Tensor:  # noqa: A002
    """max |v| (``range = "max"``) or the larger magnitude of its lowest and highest ``percentiles``."""
    v = v.detach().reshape(-1)
    if v.numel() == 0:
        return v.new_zeros((), dtype=torch.float64)
    if range == "max":
        return v.abs().max().double()
    low, high = quantiles(v, (min(percentiles) / 100, max(percentiles) / 100))
    return torch.maximum(low.abs(), high.abs())


def quantiles(v: Tensor, qs) -> Tensor:
    """``torch.quantile(v, qs)`` (linear interpolation) in float64, also past torch's 2^24-element limit."""
    v = v.detach().reshape(-1).double()
    q = torch.as_tensor(qs, dtype=torch.float64, device=v.device)  # torch.quantile wants q on v's device
    if v.numel() <= 2**24:
        return torch.quantile(v, q)
    pos = q * (v.numel() - 1)
    low, high = pos.floor().long(), pos.ceil().long()
    a = torch.stack([v.kthvalue(int(i) + 1).values for i in low])
    b = torch.stack([v.kthvalue(int(i) + 1).values for i in high])
    return a + (b - a) * (pos - low)


def quantize_minifloat_ieee(x: Tensor, width: int, exponent_width: int, exponent_bias: int | None = None) -> Tensor:
    """``minifloat_ieee``: sign, exponent and mantissa with an implicit leading 1, IEEE subnormals at
    exponent code 0. As in MASE the top exponent code holds numbers (no inf/NaN), so values saturate
    at (2 - 2^-m) * 2^(2^e - 1 - bias). Keys: width, exponent_width; exponent_bias (default 2^(e-1) - 1)."""
    bias, m = _bias(exponent_width, exponent_bias), width - exponent_width - 1
    top = (2 - 2.0**-m) * 2.0 ** (2**exponent_width - 1 - bias)
    v = _work(x)
    return _straight_through(x, torch.copysign(_round_float(v.abs(), m, 1 - bias, top), v))


def quantize_minifloat_denorm(x: Tensor, width: int, exponent_width: int, exponent_bias: int | None = None) -> Tensor:
    """``minifloat_denorm``: mantissas without an implicit bit, k * 2^(E - m) for k < 2^m and every exponent
    code E - bias in [-bias, 2^e - 1 - bias]. Keys: width, exponent_width; exponent_bias (default 2^(e-1) - 1)."""
    bias, m = _bias(exponent_width, exponent_bias), width - exponent_width - 1
    top = (2**m - 1) * 2.0 ** (2**exponent_width - 1 - bias - m)
    v = _work(x)
    # in [2^(E-1), 2^E) the grid step is 2^(E-m): a float grid with m - 1 fraction bits, uniform below 2^(-bias)
    return _straight_through(x, torch.copysign(_round_float(v.abs(), m - 1, -bias - 1, top), v))


def quantize_log(x: Tensor, width: int, exponent_bias: int | None = None) -> Tensor:
    """``log``: sign and a power of two 2^k, k in [-bias, 2^(width-1) - 1 - bias], nearest in the log domain
    (MASE's round(log2|x|)). Keys: width; exponent_bias (default 2^(width-2) - 1)."""
    bias = _bias(width - 1, exponent_bias)
    v = _work(x)
    mant, exp = torch.frexp(v.abs())  # |v| = mant * 2^exp, mant in [0.5, 1)
    # round up when 2*mant >= sqrt(2); squaring in float64 is exact for float32 mantissas
    up = (mant.double() * 2) ** 2 >= 2
    k = (exp - 1 + up).clamp(-bias, 2 ** (width - 1) - 1 - bias).to(v.dtype)
    # MASE's log has no zero code and maps 0 to 2^-bias; exact zeros stay zero here (pruned weights)
    return _straight_through(x, torch.where(v == 0, 0.0, torch.copysign(torch.exp2(k), v)))


def quantize_block_fp(
    x: Tensor, width: int, exponent_width: int, block_size: int, exponent_bias: int | None = None
) -> Tensor:
    """``block_fp`` (MSFP): each block of ``block_size`` along the last dim shares the exponent E of its
    max |x| (max < 2^E, E in [-bias, 2^e - 1 - bias]); elements are sign and (width - 1)-bit magnitude
    k * 2^(E - width + 1), k <= 2^(width-1) - 1. Keys: width, exponent_width, block_size; exponent_bias."""
    bias, v = _bias(exponent_width, exponent_bias), _work(x)
    exp = (_block_log2_max(v, block_size) + 1).clamp(-bias, 2**exponent_width - 1 - bias)
    top = (2 ** (width - 1) - 1) * torch.exp2(exp - width + 1)
    # every element lies below 2^E, so a float grid whose least normal binade is E - 1 is MSFP's uniform one
    return _straight_through(x, torch.copysign(_round_float(v.abs(), width - 2, exp - 1, top), v))


def quantize_block_minifloat(
    x: Tensor, width: int, exponent_width: int, exponent_bias_width: int, block_size: int
) -> Tensor:
    """``block_minifloat``: ``minifloat_ieee`` elements whose exponent bias is shared per block of ``block_size``
    along the last dim, chosen so the block's max |x| is in the top binade and stored in
    ``exponent_bias_width`` unsigned bits. Keys: width, exponent_width, exponent_bias_width, block_size."""
    m, v = width - exponent_width - 1, _work(x)
    bias = (2**exponent_width - 1 - _block_log2_max(v, block_size)).clamp(0, 2**exponent_bias_width - 1)
    top = (2 - 2.0**-m) * torch.exp2(2**exponent_width - 1 - bias)
    return _straight_through(x, torch.copysign(_round_float(v.abs(), m, 1 - bias, top), v))


def quantize_binary(x: Tensor, stochastic: bool = False, bipolar: bool = True) -> Tensor:
    """``binary``: bipolar +1 for x >= 0 (zero included) and -1 below; not bipolar: mean|x| of the row for
    x > 0 and 0 otherwise (MASE's). ``stochastic`` draws +1 with probability clamp((x + 1) / 2, 0, 1).
    Keys: stochastic (default false), bipolar (default true)."""
    v = _work(x)
    on = (torch.clamp((v + 1) / 2, 0, 1) >= torch.rand_like(v)) if stochastic else (v >= 0 if bipolar else v > 0)
    if bipolar:
        return _straight_through(x, torch.where(on, 1.0, -1.0).to(v.dtype))
    return _straight_through(x, on * v.abs().mean(dim=_per_row(v), keepdim=True))


def quantize_ternary(
    x: Tensor, scaling_factor: bool = False, mean: float | None = None, median: float | None = None,
    max: float | None = None,  # noqa: A002  (MASE's key name)
) -> Tensor:
    """``ternary``: sign(x) where |x| > delta, else 0; ``scaling_factor`` multiplies by the mean |x| above delta
    of the row. delta is 0.75 * mean, else 0.05 * max, else 0.75 * median when a statistic is given (MASE's
    order), otherwise 0.75 * mean|x| of each row, computed on the fly. Keys: scaling_factor, mean, median, max."""
    v = _work(x)
    rows = _per_row(v)
    if mean or max or median:
        delta = 0.75 * mean if mean else 0.05 * max if max else 0.75 * median
    else:
        delta = 0.75 * v.abs().mean(dim=rows, keepdim=True)
    keep = v.abs() > delta
    q = torch.sign(v) * keep
    if scaling_factor:  # a row with nothing above delta is all zero: no 0/0
        q = q * (v.abs() * keep).sum(dim=rows, keepdim=True) / keep.sum(dim=rows, keepdim=True).clamp(min=1)
    return _straight_through(x, q)


# OCP MX v1.0 elements: (fraction bits, least normal exponent, emax, largest value, bits)
MX_ELEMENTS = {
    # 1.6 fixed point: one binade (least normal exponent = emax) is a uniform grid; -2.0 is left unused,
    # symmetric as in the OCP reference code (microxcaling)
    "mxint8": (6, 0, 0, 127 / 64, 8),
    "mxfp8_e4m3": (3, -6, 8, 448.0, 8),
    "mxfp8_e5m2": (2, -14, 15, 57344.0, 8),
    "mxfp4": (1, 0, 2, 6.0, 4),  # E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6
}


def quantize_mx(x: Tensor, element: str, block_size: int = 32) -> Tensor:
    """OCP MX: blocks of ``block_size`` along the last dim share an E8M0 scale 2^s, s = floor(log2 max|x|) - emax
    of the element type, clamped to [-127, 127]; elements x / 2^s are rounded to ``element`` and saturate."""
    man_bits, min_exp, emax, top, _ = MX_ELEMENTS[element]
    v = _work(x)
    scale = (_block_log2_max(v, block_size) - emax).clamp(-127, 127)
    q = _round_float(v.abs(), man_bits, min_exp + scale, top * torch.exp2(scale))
    return _straight_through(x, torch.copysign(q, v))


def _mx_format(element: str, about: str) -> Callable[..., Tensor]:
    def fn(x: Tensor, block_size: int = 32) -> Tensor:
        return quantize_mx(x, element, block_size)

    fn.__name__ = fn.__qualname__ = f"quantize_{element}"
    fn.__doc__ = f"``{element}``: OCP MX with {about} elements. Key: block_size (default 32)."
    return fn


quantize_mxint8 = _mx_format("mxint8", "int8 k/64, |k| <= 127")
quantize_mxfp8_e4m3 = _mx_format("mxfp8_e4m3", "FP8 E4M3 (emax 8, max 448, no inf)")
quantize_mxfp8_e5m2 = _mx_format("mxfp8_e5m2", "FP8 E5M2 (emax 15, max 57344)")
quantize_mxfp4 = _mx_format("mxfp4", "FP4 E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6)")
