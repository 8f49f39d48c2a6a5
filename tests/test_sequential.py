"""Confidence sequences for a Bernoulli rate (``gateway.core.sequential``), without
sockets or clocks; every random draw is seeded.

- Shape: the bounds contain f/n, lie in [0, 1], are (0, 1) without trials, reach 0 and 1
  at f = 0 and f = n, are symmetric under swapping events and misses, are monotone in f,
  narrow with more data at the same rate and widen at a smaller alpha; bad arguments
  raise.
- Exactness: against an independent bisection on the defining inequality
  ``log B(1/2+f, 1/2+n-f) - log B(1/2, 1/2) - (f log p + (n-f) log(1-p)) < log(1/alpha)``
  the bounds agree to 1e-9 (absolute, and relative for the lower bound) and lie on the
  outer side of it up to rounding, on a grid and on hypothesis-drawn counts.
- Time-uniform coverage, the property the module exists for: over 2,000 simulated
  Bernoulli sequences of 2,000 trials at rates 0.1 %, 1 %, 10 % and 50 %, looked at after
  every single trial, the true rate leaves the bounds in at most alpha = 5 % of them (up
  to an exact binomial margin for simulation noise), while a 95 % Wilson interval looked
  at in the same way is left in a quarter to over half of them.
"""

from __future__ import annotations

import functools
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.sequential import Bounds, lower_bound, rate_bounds, upper_bound

ALPHAS = (0.5, 0.1, 0.05, 0.025, 0.01, 1e-3, 1e-6, 1e-12)
COUNTS = [
    (0, 1), (1, 1), (0, 2), (1, 2), (2, 2), (0, 10), (1, 10), (5, 10), (9, 10), (10, 10),
    (0, 1000), (1, 1000), (10, 1000), (500, 1000), (990, 1000), (999, 1000), (1000, 1000),
    (1, 10**6), (1000, 10**6), (500_000, 10**6), (10**6 - 1, 10**6), (3, 10**9),
]  # fmt: skip

EXAMPLES = settings(max_examples=300, deadline=None, derandomize=True, database=None)


@st.composite
def counts(draw: st.DrawFn, max_trials: int = 10**7) -> tuple[int, int]:
    """(events, trials), with events often near 0 or near trials, where canaries live."""
    n = draw(st.integers(1, max_trials))
    edge = min(n, 30)
    f = draw(st.one_of(st.integers(0, edge), st.integers(0, n), st.integers(n - edge, n)))
    return f, n


alphas = st.one_of(st.sampled_from(ALPHAS), st.floats(1e-12, 0.999))


# --- shape ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
def test_no_trials_exclude_nothing(alpha: float) -> None:
    assert rate_bounds(0, 0, alpha) == Bounds(0.0, 1.0)
    assert lower_bound(0, 0, alpha) == 0.0
    assert upper_bound(0, 0, alpha) == 1.0


def assert_shape(f: int, n: int, alpha: float) -> None:
    low, high = rate_bounds(f, n, alpha)
    assert (low, high) == (lower_bound(f, n, alpha), upper_bound(f, n, alpha))
    assert 0.0 <= low <= f / n <= high <= 1.0
    # The ends are reached exactly where the counts allow it, and only there.
    assert (low == 0.0) == (f == 0)
    if f == n:
        assert high == 1.0
    else:  # below 1, unless 1 - high (the mirror's lower bound) is below 1's rounding
        assert high < 1.0 or lower_bound(n - f, n, alpha) < math.ulp(1.0) / 2
    if 0 < f < n:
        assert low < f / n < high


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("f", "n"), COUNTS)
def test_bounds_contain_the_estimate_within_the_unit_interval(f: int, n: int, alpha: float) -> None:
    assert_shape(f, n, alpha)


@EXAMPLES
@given(counts(), alphas)
def test_bounds_contain_the_estimate_for_any_counts(fn: tuple[int, int], alpha: float) -> None:
    assert_shape(*fn, alpha)


def assert_symmetric(f: int, n: int, alpha: float) -> None:
    """Swapping events and misses mirrors the interval: p is inside for (f, n) exactly
    when 1 - p is inside for (n - f, n)."""
    low, high = rate_bounds(f, n, alpha)
    mirror_low, mirror_high = rate_bounds(n - f, n, alpha)
    assert low == pytest.approx(1 - mirror_high, rel=1e-12, abs=1e-15)
    assert high == pytest.approx(1 - mirror_low, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("f", "n"), COUNTS)
def test_bounds_are_symmetric(f: int, n: int, alpha: float) -> None:
    assert_symmetric(f, n, alpha)


@EXAMPLES
@given(counts(), alphas)
def test_bounds_are_symmetric_for_any_counts(fn: tuple[int, int], alpha: float) -> None:
    assert_symmetric(*fn, alpha)


@pytest.mark.parametrize("alpha", [0.5, 0.05, 0.025, 1e-6])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 2000])
def test_bounds_increase_with_the_events(n: int, alpha: float) -> None:
    """Both ends grow with f at a fixed n (the coverage test below relies on it to find,
    for each n, the counts whose bounds contain a given rate by bisection)."""
    lows = [lower_bound(f, n, alpha) for f in range(n + 1)]
    highs = [upper_bound(f, n, alpha) for f in range(n + 1)]
    assert all(a < b for a, b in itertools.pairwise(lows))
    assert all(a < b for a, b in itertools.pairwise(highs))


@pytest.mark.parametrize("alpha", [0.05, 0.025, 1e-6])
@pytest.mark.parametrize(("f", "n"), [(1, 10), (1, 100), (1, 3), (1, 2), (3, 7)])
def test_more_data_at_the_same_rate_narrows_the_bounds(f: int, n: int, alpha: float) -> None:
    widths = []
    for scale in (1, 2, 4, 10, 100, 1000, 10**4, 10**5):
        low, high = rate_bounds(f * scale, n * scale, alpha)
        widths.append(high - low)
    assert all(b < a for a, b in itertools.pairwise(widths)), widths
    # ... towards nothing, like sqrt(log(n) / n): by more than 50 times over 100,000 times
    # the data (sqrt(1e5) = 316, over a factor up to 6 for the log and the level).
    assert widths[-1] < widths[0] / 50


@pytest.mark.parametrize(
    ("f", "n"), [(0, 10), (1, 10), (5, 10), (10, 10), (3, 1000), (10**4, 10**5)]
)
def test_a_smaller_alpha_widens_the_bounds(f: int, n: int) -> None:
    levels = sorted(ALPHAS, reverse=True)  # less and less room for error
    lows = [lower_bound(f, n, a) for a in levels]
    highs = [upper_bound(f, n, a) for a in levels]
    if f > 0:
        assert all(b < a for a, b in itertools.pairwise(lows)), lows
    else:
        assert set(lows) == {0.0}
    if f < n:
        assert all(b > a for a, b in itertools.pairwise(highs)), highs
    else:
        assert set(highs) == {1.0}


BAD = [
    (1, 10, 0.0, "alpha"),
    (1, 10, 1.0, "alpha"),
    (1, 10, -0.05, "alpha"),
    (1, 10, 1.5, "alpha"),
    (1, 10, math.nan, "alpha"),
    (-1, 10, 0.05, "events"),
    (11, 10, 0.05, "events"),
    (0, -1, 0.05, "events"),
    (1, 0, 0.05, "events"),
]


@pytest.mark.parametrize("function", [rate_bounds, lower_bound, upper_bound])
@pytest.mark.parametrize(("f", "n", "alpha", "words"), BAD)
def test_bad_arguments_raise(function: object, f: int, n: int, alpha: float, words: str) -> None:
    assert callable(function)
    with pytest.raises(ValueError, match=words):
        function(f, n, alpha)


# --- against an independent reference ------------------------------------------------


def log_mixture_ratio(f: int, n: int, p: float) -> float:
    """log M_n(p): the Beta(1/2, 1/2) mixture's likelihood of the counts over p's."""
    log_beta = math.lgamma(0.5 + f) + math.lgamma(0.5 + n - f) - math.lgamma(1.0 + n)
    log_likelihood = (f * math.log(p) if f else 0.0) + ((n - f) * math.log1p(-p) if f < n else 0.0)
    return log_beta - math.log(math.pi) - log_likelihood


def inside(f: int, n: int, p: float, alpha: float) -> bool:
    return log_mixture_ratio(f, n, p) < math.log(1 / alpha)


def bisect(f: int, n: int, alpha: float, outside: float, within: float) -> tuple[float, float]:
    """Halve [outside, within] (the first end outside the set, the second inside) down to
    neighbouring doubles."""
    while True:
        mid = (outside + within) / 2
        if not min(outside, within) < mid < max(outside, within):
            return outside, within
        if inside(f, n, mid, alpha):
            within = mid
        else:
            outside = mid


def reference(f: int, n: int, alpha: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Each end of the set as (last point outside, first point inside). The set always
    holds f/n (there M_n is the mixture over the maximum likelihood, at most 1); 0 is
    outside when f > 0 and 1 when f < n (the likelihood vanishes there)."""
    assert inside(f, n, f / n, alpha)
    low = (0.0, 0.0) if f == 0 else bisect(f, n, alpha, 0.0, f / n)
    high = (1.0, 1.0) if f == n else bisect(f, n, alpha, 1.0, f / n)
    return low, high


# Rounding: the inequality's terms reach n |log p|, so where it is evaluated (in doubles,
# by the module in log p and by the reference in p) its two sides agree only to some
# 1e-16 of that; near the bound the log likelihood's slope turns this into a relative
# error in the bound well below 1e-12 for the counts tested (n <= 1e7, and 1e9 only at
# f = 3 where the bound is found in log p as accurately as any).
ROUNDING = 1e-12


def assert_matches_reference(f: int, n: int, alpha: float) -> None:
    (_, low_in), (_, high_in) = reference(f, n, alpha)
    low, high = rate_bounds(f, n, alpha)
    # Within 1e-9 of the reference (and, for the small rates canaries live at, within a
    # relative 1e-9 of it too).
    assert abs(low - low_in) <= 1e-9 and abs(high - high_in) <= 1e-9, (low, high, low_in, high_in)
    assert abs(low - low_in) <= 1e-9 * low_in, (low, low_in)
    assert abs((1 - high) - (1 - high_in)) <= 1e-9 * (1 - high_in) + 4 * math.ulp(1.0)
    # On the outer side: never inside the set by more than rounding.
    assert low <= low_in + ROUNDING * low_in, (low, low_in)
    assert high >= high_in - ROUNDING * (1 - high_in) - 4 * math.ulp(1.0), (high, high_in)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("f", "n"), COUNTS)
def test_bounds_match_a_bisection_on_the_defining_inequality(f: int, n: int, alpha: float) -> None:
    assert_matches_reference(f, n, alpha)


@EXAMPLES
@given(counts(), alphas)
def test_bounds_match_the_reference_for_any_counts(fn: tuple[int, int], alpha: float) -> None:
    assert_matches_reference(*fn, alpha)


def test_the_reference_can_tell_a_wrong_bound() -> None:
    """The comparison is sharp enough to see a bound computed at another level or with
    another mixture's normaliser."""
    f, n, alpha = 10, 1000, 0.05
    (_, low_in), (_, high_in) = reference(f, n, alpha)
    assert abs(lower_bound(f, n, alpha / 1.01) - low_in) > 1e-6
    assert abs(upper_bound(f, n, alpha * 1.01) - high_in) > 1e-6
    # One event in one trial: the set is {p : p > alpha / 2} (M_1(p) = (1/2) / p).
    assert lower_bound(1, 1, alpha) == pytest.approx(alpha / 2, rel=1e-12)
    assert upper_bound(0, 1, alpha) == pytest.approx(1 - alpha / 2, rel=1e-12)


# --- time-uniform coverage -----------------------------------------------------------

ALPHA = 0.05
ALPHA_EXACTLY = Fraction(1, 20)
SEQUENCES = 2_000
LENGTH = 2_000
RATES = (0.001, 0.01, 0.1, 0.5)
# A test that fails with a correct module for at most this share of seeds.
NOISE = Fraction(1, 10_000)


@functools.cache
def binomial_upper_limit(trials: int, chance: Fraction, level: Fraction = NOISE) -> int:
    """The least c with P(Binomial(trials, chance) > c) <= level, in exact arithmetic
    (integers: each probability times chance's denominator to the power ``trials``).

    Each sequence leaves a confidence sequence's bounds with probability q <= alpha
    (Ville's inequality, over an infinite horizon; a finite one only lowers q), and the
    sequences are independent, so the number that leave is Binomial(SEQUENCES, q), which
    exceeds this limit for chance = alpha with probability at most ``level``."""
    hit, whole = chance.numerator, chance.denominator
    allowed = level * whole**trials  # the level, in the same units
    tail = 0
    for k in range(trials, -1, -1):
        tail += math.comb(trials, k) * hit**k * (whole - hit) ** (trials - k)
        if tail > allowed:
            return k
    return -1


def test_the_binomial_limit() -> None:
    # P(Bin(2, 1/2) > 1) = 1/4, P(Bin(2, 1/2) > 0) = 3/4.
    assert binomial_upper_limit(2, Fraction(1, 2), Fraction(1, 4)) == 1
    assert binomial_upper_limit(2, Fraction(1, 2), Fraction(1, 5)) == 2
    assert binomial_upper_limit(2, Fraction(1, 2), Fraction(3, 4)) == 0
    # Mean 100 and standard deviation 9.7 at the settings used: about 3.7 sd above.
    assert 130 <= binomial_upper_limit(SEQUENCES, Fraction(1, 20)) <= 140


def acceptance(rate: float, length: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """For each number of trials n (index n, 0..length), the least and the most events
    whose bounds contain ``rate``. As both ends of the bounds increase with the events
    (test_bounds_increase_with_the_events), these are found by bisection on f and a
    sequence holds the rate inside at trial n exactly when its count lies between them:
    looking at every prefix costs some 40,000 calls to the module, not 4 million."""
    least = np.zeros(length + 1, dtype=np.int64)
    most = np.zeros(length + 1, dtype=np.int64)
    for n in range(1, length + 1):
        a, b = 0, n  # upper_bound(n, n) == 1 >= rate
        while a < b:
            m = (a + b) // 2
            if upper_bound(m, n, alpha) >= rate:
                b = m
            else:
                a = m + 1
        least[n] = a
        a, b = 0, n  # lower_bound(0, n) == 0 <= rate
        while a < b:
            m = (a + b + 1) // 2
            if lower_bound(m, n, alpha) <= rate:
                a = m
            else:
                b = m - 1
        most[n] = a
        assert least[n] <= most[n]  # f = round(rate * n) is always inside
    return least, most


@functools.cache
def event_counts(rate: float) -> np.ndarray:
    """SEQUENCES independent Bernoulli(rate) sequences of LENGTH trials, seeded: row i,
    column j is the number of events in the first j + 1 trials of sequence i."""
    rng = np.random.default_rng([20_240_611, RATES.index(rate)])
    events = rng.random((SEQUENCES, LENGTH)) < rate
    return np.cumsum(events, axis=1, dtype=np.int16)


@functools.cache
def confidence_sequence_misses(rate: float) -> int:
    """How many of the sequences have the rate outside the bounds at some trial. Every
    prefix is looked at: the most looks a controller could take, so the strictest test
    (fewer looks can only see fewer of the sequences leave)."""
    least, most = acceptance(rate, LENGTH, ALPHA)
    counts = event_counts(rate)
    outside = (counts < least[1:]) | (counts > most[1:])
    return int(outside.any(axis=1).sum())


def wilson(
    counts: np.ndarray, n: np.ndarray, z: float = 1.959963984540054
) -> tuple[np.ndarray, np.ndarray]:
    """The 95 % Wilson score interval: right at one fixed sample size, not at many."""
    share = counts / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@functools.cache
def wilson_misses(rate: float) -> tuple[int, int]:
    """(sequences whose rate is outside Wilson's interval at some trial, at the last)."""
    counts = event_counts(rate)
    low, high = wilson(counts, np.arange(1, LENGTH + 1))
    outside = (rate < low) | (rate > high)
    return int(outside.any(axis=1).sum()), int(outside[:, -1].sum())


@pytest.mark.parametrize("rate", RATES)
def test_the_rate_stays_inside_at_every_look_with_probability_one_minus_alpha(rate: float) -> None:
    limit = binomial_upper_limit(SEQUENCES, ALPHA_EXACTLY)
    misses = confidence_sequence_misses(rate)
    print(
        f"\nrate {rate:.1%}: the true rate left the confidence sequence in {misses} of "
        f"{SEQUENCES} sequences ({misses / SEQUENCES:.2%}; at most {limit} allowed)"
    )
    assert misses <= limit


@pytest.mark.parametrize("rate", RATES)
def test_a_fixed_sample_interval_looked_at_every_time_is_not(rate: float) -> None:
    """Why the module exists: a 95 % Wilson interval, right at any one sample size, is
    left by far more than 5 % of the same sequences when looked at after every trial, so
    many that a rate of 5 % is ruled out by the same margin the test above allows."""
    limit = binomial_upper_limit(SEQUENCES, ALPHA_EXACTLY)
    ever, at_the_end = wilson_misses(rate)
    print(
        f"\nrate {rate:.1%}: a 95% Wilson interval was left at some look by {ever} of "
        f"{SEQUENCES} sequences ({ever / SEQUENCES:.2%}), at the last look alone by "
        f"{at_the_end} ({at_the_end / SEQUENCES:.2%}); the confidence sequence by "
        f"{confidence_sequence_misses(rate)}"
    )
    assert ever > limit
    assert ever >= 4 * ALPHA * SEQUENCES
    # ... though at one look it is about right (it is the looks that break it).
    assert 0.03 * SEQUENCES <= at_the_end <= 0.08 * SEQUENCES


def test_the_acceptance_region_is_the_module_s() -> None:
    """The shortcut of the coverage test is exact: at every n, the counts it accepts are
    those whose bounds contain the rate, and no others (checked at every f for some n)."""
    rate = 0.1
    least, most = acceptance(rate, 300, ALPHA)
    for n in (1, 2, 7, 50, 299, 300):
        held = [
            f for f in range(n + 1) if lower_bound(f, n, ALPHA) <= rate <= upper_bound(f, n, ALPHA)
        ]
        assert held == list(range(least[n], most[n] + 1))
