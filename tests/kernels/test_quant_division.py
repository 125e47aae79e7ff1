"""The quantizer's division y / s as a multiply and two fmas (kernels/fake_quant.py ``_div``,
csrc/quant_math.h ``div_by``), proven equal to the IEEE quotient in numpy.

With r = RN(1 / s) once per row, q0 = RN(y r), e = fma(-q0, s, y) and q = fma(e, r, q0)
must be RN(y / s) bit for bit (so round(y / s), the code, is unchanged). numpy has no fma:
``fma32`` rounds a b + c once (a b exact in float64, TwoSum for the error of the float64
sum, and a fix where that sum lies on a float32 midpoint); it is itself checked against
exact rational arithmetic. The domain: normal floats, |y| >= 2^-100 (below, e underflows
and q may be an ulp off, but |y / s| < 2^-73 with s >= 1e-8 rounds to 0 both ways) and
quotients below overflow.
"""

from fractions import Fraction

import numpy as np
import pytest

CHUNK = 1 << 12  # mantissas of s per batch: [24 boundaries x 5 dividends, CHUNK] arrays
KS = np.arange(-8, 16)  # [0, 15] asymmetric codes, [-8, 7] symmetric ones (their k < 0 here)
ULPS = np.arange(-2, 3)


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """RN32(a b + c) of float32 arrays, rounded once (normal float32 results)."""
    a, b, c = np.broadcast_arrays(a, b, c)
    s = a.astype(np.float64)
    s *= b  # exact: 24 + 24 bits
    s += c
    # s rounds to float32 as a b + c does unless s is a float32 midpoint that a b + c is off
    # (by the error t of the float64 sum): there, step s one float64 ulp towards a b + c
    mid = np.nonzero((s.view(np.uint64) & np.uint64(2**29 - 1)) == np.uint64(2**28))
    if mid[0].size:
        p = a[mid].astype(np.float64) * b[mid]
        sm, cm = s[mid], c[mid]
        v = sm - p
        t = (p - (sm - v)) + (cm - v)  # TwoSum: sm + t == p + cm exactly
        s[mid] = np.where(t != 0, np.nextafter(sm, np.copysign(np.inf, t)), sm)
    return s.astype(np.float32)


def markstein(y: np.ndarray, s: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The kernels' quotient: q0 = y r, q = fma(fma(-q0, s, y), r, q0)."""
    q0 = y * r
    return fma32(fma32(-q0, s, y), r, q0)


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.view(np.uint32) == b.view(np.uint32)


def rn32(x: Fraction) -> np.float32:
    """The float32 nearest to a rational (ties to even), normal range."""
    if x == 0:
        return np.float32(0.0)
    sign, x = (-1 if x < 0 else 1), abs(x)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    if Fraction(2) ** e > x:
        e -= 1
    m = round(x / Fraction(2) ** (e - 23))  # in [2^23, 2^24], half to even
    return np.float32(sign * float(m * Fraction(2) ** (e - 23)))


def exact_fma(a, b, c) -> np.ndarray:
    return np.array([rn32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                     for x, y, z in zip(a, b, c)], dtype=np.float32)


def f32(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.float32)


def test_fma32_rounds_once():
    """Against exact rationals: the kernels' operand pairs, random triples and sums whose
    float64 value lands on a float32 midpoint the exact value is not on (the double rounding
    that a naive float64 fma emulation gets wrong)."""
    g = np.random.default_rng(0)
    u = 2.0**-23
    # exact = (1 + u) + 2^-24 (1 - 2^-46): just below a midpoint, rounds down to 1 + u
    a, b, c = f32(2.0**-24 * (1 + u)), f32(1 - u), f32(1 + u)
    naive = (a.astype(np.float64) * b + c).astype(np.float32)
    assert naive[0] == np.float32(1 + 2 * u) and fma32(a, b, c)[0] == np.float32(1 + u)
    assert fma32(-a, b, -c)[0] == np.float32(-(1 + u))  # the same, above the midpoint
    a = np.concatenate([a, -a])
    b = np.concatenate([b, b])
    c = np.concatenate([c, -c])
    s = (np.uint32(0x3F800000) | g.integers(0, 2**23, 300, dtype=np.uint32)).view(np.float32)
    s = s * np.float32(2.0) ** g.integers(-20, 20, 300).astype(np.float32)
    y = (g.uniform(-16, 16, 300) * s).astype(np.float32)
    r = np.float32(1) / s
    q0 = y * r
    e = fma32(-q0, s, y)
    ra, rb, rc = (g.standard_normal((3, 300)) * 2.0 ** g.integers(-30, 30, (3, 300))).astype(
        np.float32)
    a = np.concatenate([a, -q0, e, ra])
    b = np.concatenate([b, s, r, rb])
    c = np.concatenate([c, y, q0, rc])
    assert same_bits(fma32(a, b, c), exact_fma(a, b, c)).all()


def boundary_batch(lo: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, s) [len(KS) * 5, CHUNK]: s = 1 + m 2^-23 for the CHUNK mantissas m from lo, y at
    RN((k + 0.5) s) and 1 and 2 ulps either side."""
    s = (np.uint32(0x3F800000) + np.arange(lo, lo + CHUNK, dtype=np.uint32)).view(np.float32)
    mid = ((KS + 0.5).astype(np.float32)[:, None] * s[None, :]).view(np.int32)
    y = (mid[:, None, :] + ULPS[None, :, None].astype(np.int32)).view(np.float32)
    return y.reshape(-1, CHUNK), s[None, :]


def test_the_formula_is_needed():
    """The test has teeth: q0 = RN(y RN(1 / s)) alone misses the IEEE quotient at boundaries."""
    y, s = boundary_batch(2**23 - CHUNK)
    assert not same_bits(y * (np.float32(1) / s), y / s).all()


@pytest.mark.slow
def test_quotient_is_ieee_for_every_mantissa_at_every_rounding_boundary():
    """Every fp32 mantissa of s in [1, 2) (the formula scales with the exponents of y and s),
    dividends at and around each half-integer boundary of the 4-bit code ranges: where
    round(y / s) changes, one ulp off would change the code."""
    bad = 0
    for lo in range(0, 2**23, CHUNK):
        y, s = boundary_batch(lo)
        r = np.float32(1) / s
        bad += int((~same_bits(markstein(y, s, r), y / s)).sum())
    assert bad == 0


@pytest.mark.slow
def test_quotient_is_ieee_on_random_pairs():
    """2^22 random (y, s): s from 1e-8 to 1e4 with random mantissas, y = s t (t in [-20, 20],
    the codes' range and past it) or any float with |y| in [2^-100, 2^100] (the quantizer's
    z and far-off values of a row); below 2^-100 the rounded quotient is still the same."""
    g = np.random.default_rng(1)
    for _ in range(4):
        n = 1 << 20
        s = np.exp(g.uniform(np.log(1e-8), np.log(1e4), n)).astype(np.float32)
        s = (s.view(np.uint32) ^ g.integers(0, 2**12, n, dtype=np.uint32)).view(np.float32)
        t = g.uniform(-20, 20, n)
        wide = np.ldexp(g.uniform(1, 2, n), g.integers(-100, 100, n)) * g.choice([-1, 1], n)
        y = np.where(np.arange(n) % 2 == 0, s * t, wide).astype(np.float32)
        r = np.float32(1) / s
        with np.errstate(over="ignore"):
            q, want = markstein(y, s, r), y / s
        ok = np.isfinite(want) & (np.abs(want) < 2.0**126)
        assert ok.mean() > 0.95
        assert same_bits(q[ok], want[ok]).all()
        tiny = (g.uniform(-1, 1, 4096) * 2.0**-110).astype(np.float32)
        st = s[:4096]
        with np.errstate(under="ignore"):
            assert (np.rint(markstein(tiny, st, r[:4096])) == np.rint(tiny / st)).all()
