"""Quantization formats against references built here: every representable value of a
format enumerated with plain Python loops, and the nearest one picked in exact rational
arithmetic (ties to the even code). Inputs include every representable value, the exact
halfway points between neighbours, quarter points, values past the largest one, zero and
negatives."""

import bisect
import math
from fractions import Fraction

import pytest
import torch

from graphprune.infra.config import ConfigError
from graphprune.passes.quantization.format_specs import FORMATS, average_bits, quantizer

# ---- references ----------------------------------------------------------------------


def signed(magnitudes) -> list[float]:
    return sorted({s * m for m in magnitudes for s in (1.0, -1.0)} | {0.0})


def int_grid(width, frac_width):
    return [k * 2.0**-frac_width for k in range(-(2 ** (width - 1)), 2 ** (width - 1))]


def ieee_grid(exponent_width, man_bits, bias, top=None):
    """Zero, subnormals k * 2^(1-bias-m) and normals (1 + k/2^m) * 2^(code-bias) for codes 1..2^e-1."""
    mags = {k * 2.0 ** (1 - bias - man_bits) for k in range(2**man_bits)}
    for code in range(1, 2**exponent_width):
        mags |= {(1 + k / 2**man_bits) * 2.0 ** (code - bias) for k in range(2**man_bits)}
    return signed(m for m in mags if top is None or m <= top)


def denorm_grid(exponent_width, man_bits, bias):
    return signed(k * 2.0 ** (e - man_bits) for e in range(-bias, 2**exponent_width - bias) for k in range(2**man_bits))


def nearest(v: float, grid: list[float]) -> float:
    """The grid value nearest to v (saturating at both ends); a tie goes to the neighbour that is
    an even multiple of the gap between the two, i.e. the even code."""
    if v <= grid[0] or v >= grid[-1]:
        return grid[0] if v <= grid[0] else grid[-1]
    i = bisect.bisect_left(grid, v)
    a, b = grid[i - 1], grid[i]
    if b == v:
        return b
    below, above = Fraction(v) - Fraction(a), Fraction(b) - Fraction(v)
    if below != above:
        return a if below < above else b
    step = Fraction(b) - Fraction(a)
    return a if (Fraction(a) / step) % 2 == 0 else b


def probes(grid) -> list[float]:
    """Every grid value, the halfway and quarter points between neighbours, and values past the ends."""
    out = list(grid)
    for a, b in zip(grid, grid[1:]):
        out += [(a + b) / 2, a + (b - a) / 4, a + 3 * (b - a) / 4]
    top = grid[-1]
    out += [top * 1.01, top * 1.5, top * 4, 1e30, -top * 1.5, -1e30]
    return out


def check(fmt, entry, values, reference, dtype=torch.float32):
    x = torch.tensor(values, dtype=dtype)
    got = quantizer(fmt, "weight", entry)(x)
    want = torch.tensor([reference(v) for v in x.tolist()], dtype=dtype)
    bad = (got != want).nonzero().flatten()[:5].tolist()
    assert not bad, [(x[i].item(), got[i].item(), want[i].item()) for i in bad]


def entry(**keys):
    return {f"weight_{k}": v for k, v in keys.items()}


# ---- elementwise formats ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width,frac", [(4, 2), (3, 0), (5, -1), (4, 5), (8, 4)])
def test_integer_round_half_even(width, frac, dtype):
    grid = int_grid(width, frac)
    check("integer", entry(width=width, frac_width=frac), probes(grid), lambda v: nearest(v, grid), dtype)


@pytest.mark.parametrize("width,frac", [(4, 2), (3, 0)])
def test_integer_floor(width, frac):
    grid = int_grid(width, frac)
    floor = lambda v: max([g for g in grid if g <= v], default=grid[0])  # noqa: E731
    check("integer", entry(width=width, frac_width=frac, floor=True), probes(grid), floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width,e,bias", [(8, 4, None), (6, 3, 2), (4, 2, None), (5, 4, None), (7, 3, -2)])
def test_minifloat_ieee(width, e, bias, dtype):
    grid = ieee_grid(e, width - e - 1, 2 ** (e - 1) - 1 if bias is None else bias)
    check("minifloat_ieee", entry(width=width, exponent_width=e, exponent_bias=bias), probes(grid),
          lambda v: nearest(v, grid), dtype)


@pytest.mark.parametrize("width,e,bias", [(8, 4, None), (5, 2, 0), (4, 2, None), (6, 2, 3)])
def test_minifloat_denorm(width, e, bias):
    grid = denorm_grid(e, width - e - 1, 2 ** (e - 1) - 1 if bias is None else bias)
    check("minifloat_denorm", entry(width=width, exponent_width=e, exponent_bias=bias), probes(grid),
          lambda v: nearest(v, grid))


@pytest.mark.parametrize("width,bias", [(4, None), (5, 3), (3, 0)])
def test_log_nearest_in_log_domain(width, bias):
    bias = 2 ** (width - 2) - 1 if bias is None else bias
    low, high = -bias, 2 ** (width - 1) - 1 - bias

    def reference(v):
        if v == 0:
            return 0.0
        k = math.frexp(abs(v))[1] - 1  # 2^k <= |v| < 2^(k+1)
        if Fraction(abs(v)) ** 2 >= Fraction(2) ** (2 * k + 1):  # |v| >= 2^(k + 1/2)
            k += 1
        return math.copysign(2.0 ** min(max(k, low), high), v)

    values = [0.0]
    for k in range(low - 3, high + 3):
        root = torch.tensor(2.0 ** (k + 0.5), dtype=torch.float32)  # the log-domain midpoint and both neighbours
        for v in (2.0**k, 1.5 * 2.0**k, root.item(), torch.nextafter(root, root * 2).item(),
                  torch.nextafter(root, root * 0).item()):
            values += [v, -v]
    check("log", entry(width=width, exponent_bias=bias), values, reference)


def test_binary():
    x = torch.tensor([[0.0, -0.0, 1e-30, -1e-30, 3.0], [-3.0, 2.0, 0.0, -0.5, 0.5]])
    assert quantizer("binary", "weight", {})(x).tolist() == [[1, 1, 1, -1, 1], [-1, 1, 1, -1, 1]]
    zero_one = quantizer("binary", "weight", entry(bipolar=False))(x)  # mean |x| of the row where x > 0
    rows = x.abs().mean(dim=1, keepdim=True)
    assert torch.equal(zero_one, (x > 0) * rows)
    torch.manual_seed(0)
    far = torch.tensor([5.0, -5.0, 1.0, -1.0] * 8)
    assert quantizer("binary", "weight", entry(stochastic=1, bipolar=1))(far).tolist() == far.sign().tolist()
    assert set(quantizer("binary", "weight", entry(stochastic=True))(torch.randn(200)).tolist()) == {-1.0, 1.0}


def test_ternary():
    x = torch.tensor([[0.0, 1.0, -2.0, 3.0, -4.0, 0.5], [0.1, 0.0, 0.0, 0.0, 0.0, -0.1]])
    # row 0: delta = 0.75 * 10.5 / 6 = 1.3125; row 1: delta = 0.025
    assert quantizer("ternary", "weight", {})(x).tolist() == [[0, 0, -1, 1, -1, 0], [1, 0, 0, 0, 0, -1]]
    scaled = quantizer("ternary", "weight", entry(scaling_factor=True))(x)
    torch.testing.assert_close(scaled, torch.tensor([[0, 0, -3.0, 3, -3, 0], [0.1, 0, 0, 0, 0, -0.1]]))
    by_stat = {"mean": (2.0, 1.5), "max": (10.0, 0.5), "median": (1.0, 0.75)}
    for stat, (value, delta) in by_stat.items():
        q = quantizer("ternary", "weight", {**entry(mean="NA", median="NA", max="NA"), f"weight_{stat}": value})(x)
        assert torch.equal(q, x.sign() * (x.abs() > delta)), stat


# ---- block formats: one reference grid per block -----------------------------------


def block_reference(grid_of_block, size):
    """Quantize a list by blocks of ``size``: each block's grid comes from its own max |x|."""
    def run(values):
        out = []
        for i in range(0, len(values), size):
            block = values[i:i + size]
            grid = grid_of_block(max(abs(v) for v in block))
            out += [0.0 if v == 0 else nearest(v, grid) for v in block]
        return out
    return run


def block_rows(grid_of_block, maxima, size):
    """Rows of one block each, led by the block's max and filled with probes of that block's grid."""
    rows = []
    for top in maxima:
        inside = [v for v in probes(grid_of_block(top)) if abs(v) <= top]
        for i in range(0, len(inside), size - 1):
            chunk = inside[i:i + size - 1]
            rows.append([top, *chunk, *[0.0] * (size - 1 - len(chunk))])
    return rows + [[0.0] * size, [-m for m in rows[0]]]


def floor_log2(v: float) -> int:
    return math.frexp(v)[1] - 1


def check_blocks(fmt, keys, grid_of_block, maxima, size, dtype=torch.float32):
    rows = block_rows(grid_of_block, maxima, size)
    x = torch.tensor(rows, dtype=dtype)
    got = quantizer(fmt, "weight", keys)(x)
    reference = block_reference(grid_of_block, size)
    want = torch.tensor([reference(r) for r in x.tolist()], dtype=dtype)
    bad = (got != want).nonzero()[:5].tolist()
    assert not bad, [(x[i, j].item(), got[i, j].item(), want[i, j].item()) for i, j in bad]
    # blocks run along the last dim of any shape, and a last block that does not fill up is padded
    flat = x.reshape(-1)[: 3 * 2 * size]
    torch.testing.assert_close(quantizer(fmt, "weight", keys)(flat.reshape(3, 2, size)).reshape(-1),
                               quantizer(fmt, "weight", keys)(flat.reshape(-1, size)).reshape(-1), rtol=0, atol=0)
    ragged = x[:4, : size - 3]
    want = torch.tensor([reference(r) for r in ragged.tolist()], dtype=dtype)
    assert torch.equal(quantizer(fmt, "weight", keys)(ragged), want)


MX = {  # element grid (as ieee_grid or int_grid) and emax, from the OCP MX v1.0 tables
    "mxint8": ([k / 64 for k in range(-127, 128)], 0),
    "mxfp8_e4m3": (ieee_grid(4, 3, 7, top=448.0), 8),
    "mxfp8_e5m2": (ieee_grid(5, 2, 15, top=57344.0), 15),
    "mxfp4": (ieee_grid(2, 1, 1), 2),
}


def test_mx_element_grids_match_the_spec():
    assert [v for v in MX["mxfp4"][0] if v >= 0] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert max(MX["mxfp8_e4m3"][0]) == 448 and min(v for v in MX["mxfp8_e4m3"][0] if v > 0) == 2.0**-9
    assert max(MX["mxfp8_e5m2"][0]) == 57344 and min(v for v in MX["mxfp8_e5m2"][0] if v > 0) == 2.0**-16


@pytest.mark.parametrize("fmt", sorted(MX))
@pytest.mark.parametrize("size", [32, 8])
def test_mx(fmt, size):
    elements, emax = MX[fmt]

    def grid(top):
        scale = min(max(floor_log2(top) - emax, -127), 127) if top else 0  # E8M0: 2^-127 .. 2^127
        return [math.ldexp(v, scale) for v in elements]

    # the element's max normal and just under the next power of two (saturates), tiny (scale clamps at 2^-127)
    maxima = [1.0, 448.0, 7.5, 1.99, 57344.0 * 1.1, 3e-3, 2.0**-130]
    keys = {} if size == 32 else entry(block_size=size)
    check_blocks(fmt, keys, grid, maxima, size)


@pytest.mark.parametrize("width,e,bias,size", [(4, 3, None, 8), (6, 8, 127, [1, 16]), (3, 2, 0, 4)])
def test_block_fp(width, e, bias, size):
    b = 2 ** (e - 1) - 1 if bias is None else bias
    n = size[-1] if isinstance(size, list) else size

    def grid(top):
        shared = min(max(math.frexp(top)[1], -b), 2**e - 1 - b)  # smallest E with top < 2^E, clamped
        return [k * 2.0 ** (shared - width + 1) for k in range(-(2 ** (width - 1)) + 1, 2 ** (width - 1))]

    maxima = [1.0, 3.0, 0.3, 100.0, 2.0**-5, 1e5]
    check_blocks("block_fp", entry(width=width, exponent_width=e, exponent_bias=bias, block_size=size), grid, maxima, n)


@pytest.mark.parametrize("width,e,bias_width,size", [(6, 3, 4, 8), (8, 4, 8, [1, 16]), (4, 2, 3, 4)])
def test_block_minifloat(width, e, bias_width, size):
    n = size[-1] if isinstance(size, list) else size

    def grid(top):
        bias = min(max(2**e - 1 - floor_log2(top), 0), 2**bias_width - 1)  # the block's max in the top binade
        return ieee_grid(e, width - e - 1, bias)

    maxima = [1.0, 0.05, 3.5, 2.0**-20, 1e6]
    keys = entry(width=width, exponent_width=e, exponent_bias_width=bias_width, block_size=size)
    check_blocks("block_minifloat", keys, grid, maxima, n)


# ---- every format: gradient, dtype, shape, zeros ---------------------------------

EXAMPLES = {
    "integer": entry(width=8, frac_width=4),
    "minifloat_ieee": entry(width=8, exponent_width=4),
    "minifloat_denorm": entry(width=8, exponent_width=4, exponent_bias="none"),
    "log": entry(width=8, exponent_bias=7),
    "block_fp": entry(width=6, exponent_width=8, exponent_bias=127, block_size=[1, 16]),
    "block_minifloat": entry(width=8, exponent_width=4, exponent_bias_width=8, block_size=16),
    "binary": entry(width=1, frac_width=0, stochastic=0, bipolar=1),  # as MASE's configs/tests/quantize/binary.toml
    "ternary": entry(width=2, scaling_factor=True, mean="NA", median="NA", max="NA"),
    "mxint8": {}, "mxfp8_e4m3": {}, "mxfp8_e5m2": entry(block_size=16), "mxfp4": {},
}


def test_every_format_has_an_example():
    assert set(EXAMPLES) == set(FORMATS)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_gradient_is_straight_through(fmt):
    x = (torch.randn(3, 40) * 4).requires_grad_()
    quantizer(fmt, "weight", EXAMPLES[fmt])(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 40)])
def test_dtype_and_shape_kept(fmt, dtype, shape):
    y = quantizer(fmt, "weight", EXAMPLES[fmt])(torch.randn(shape).to(dtype))
    assert y.dtype == dtype and y.shape == shape and not y.requires_grad


@pytest.mark.parametrize("fmt", sorted(set(FORMATS) - {"binary"}))
def test_zeros_stay_zero(fmt):
    x = torch.randn(4, 48)
    x[x.abs() < 0.8] = 0.0  # about half pruned, and one whole block/row
    x[1] = 0.0
    y = quantizer(fmt, "weight", EXAMPLES[fmt])(x)
    assert torch.equal(y[x == 0], torch.zeros_like(y[x == 0]))


def test_values_are_exact_after_a_second_pass():
    for fmt in sorted(set(FORMATS) - {"binary", "ternary"}):  # idempotent: the output is representable
        q = quantizer(fmt, "weight", EXAMPLES[fmt])
        y = q(torch.randn(4, 64) * 3)
        assert torch.equal(q(y), y), fmt


# ---- keys and errors ------------------------------------------------------------------


def test_missing_key_names_the_format_and_its_keys():
    needs = r"'weight_frac_width'.*an integer \(missing\); format 'integer' needs weight_width, weight_frac_width"
    with pytest.raises(ConfigError, match=needs):
        quantizer("integer", "weight", {"weight_width": 8, "data_in_frac_width": 3})
    with pytest.raises(ConfigError, match=r"'bias_width'.*format 'integer'"):
        quantizer("integer", "bias", EXAMPLES["integer"])  # only the prefix's own keys count


def test_misspelt_key_is_refused():
    with pytest.raises(ConfigError, match=r"'data_in_exponent_widht'.*format 'minifloat_ieee' needs data_in_width"):
        quantizer("minifloat_ieee", "data_in", {"data_in_width": 8, "data_in_exponent_widht": 4})
    with pytest.raises(ConfigError, match=r"'weight_frac_width'.*format 'mxint8'"):
        quantizer("mxint8", "weight", entry(frac_width=4))


@pytest.mark.parametrize("fmt,keys,field", [
    ("integer", entry(width=0, frac_width=2), "weight_width"),
    ("integer", entry(width=8, frac_width=2.5), "weight_frac_width"),
    ("integer", entry(width=True, frac_width=2), "weight_width"),
    ("integer", entry(width=8, frac_width=2, floor="yes"), "weight_floor"),
    ("minifloat_ieee", entry(width=4, exponent_width=4), "weight_exponent_width"),
    ("minifloat_denorm", entry(width=4, exponent_width=3), "weight_exponent_width"),
    ("log", entry(width=1), "weight_width"),
    ("block_fp", entry(width=4, exponent_width=4, block_size=0), "weight_block_size"),
    ("block_fp", entry(width=4, exponent_width=4, block_size=[4, 16]), "weight_block_size"),
    ("block_minifloat", entry(width=8, exponent_width=4, exponent_bias_width=0, block_size=16),
     "weight_exponent_bias_width"),
    ("binary", entry(width=2), "weight_width"),
    ("ternary", entry(mean="big"), "weight_mean"),
    ("mxfp4", entry(block_size=-32), "weight_block_size"),
])
def test_bad_values(fmt, keys, field):
    with pytest.raises(ConfigError, match=rf"'{field}'.*format '{fmt}'") as error:
        quantizer(fmt, "weight", keys)
    assert error.value.field == field


def test_unknown_format_and_untouched_entry():
    with pytest.raises(ConfigError, match=r"'mxint4'.*mxfp4"):
        quantizer("mxint4", "weight", {})
    keys = entry(width=8, frac_width=4)
    quantizer("integer", "weight", keys)
    assert keys == {"weight_width": 8, "weight_frac_width": 4}


@pytest.mark.parametrize("fmt,keys,bits", [
    ("integer", entry(width=8, frac_width=4), 8),
    ("minifloat_ieee", entry(width=6, exponent_width=3), 6),
    ("log", entry(width=5), 5),
    ("block_fp", entry(width=7, exponent_width=8, block_size=[1, 16]), 7.5),
    ("block_minifloat", entry(width=8, exponent_width=4, exponent_bias_width=4, block_size=16), 8.25),
    ("binary", {}, 1),
    ("ternary", {}, 2),
    ("mxint8", {}, 8.25),
    ("mxfp8_e4m3", entry(block_size=16), 8.5),
    ("mxfp8_e5m2", {}, 8.25),
    ("mxfp4", {}, 4.25),
])
def test_average_bits(fmt, keys, bits):
    assert average_bits(fmt, "weight", keys) == bits
