"""Confidence sequences for rates: bounds that stay valid however often they are looked at.

A canary controller looks at its counts every few seconds for as long as a canary runs.
A fixed-sample test (a z-test, a Wilson interval) repeated at every look is wrong far more
often than its nominal level says: the chance that *some* look crosses the line grows
with the number of looks. A confidence sequence is an interval for each sample size such
that, with probability at least ``1 - alpha``, the true rate lies inside **every one of
them at once**: looking after every request, or every five seconds, or stopping as soon
as a bound crosses a line, keeps the guarantee (Howard, Ramdas, McAuliffe and Sekhon,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", Annals of
Statistics 2021).

The one used here is the method of mixtures for Bernoulli counts. For a candidate rate
``p`` and ``f`` events in ``n`` trials, the likelihood ratio of a Beta(1/2, 1/2) mixture of
rates against ``p`` (the Krichevsky-Trofimov mixture)

    M_n(p) = B(1/2 + f, 1/2 + n - f) / B(1/2, 1/2)  /  (p^f (1 - p)^(n - f))

is a nonnegative martingale with mean 1 when ``p`` is the true rate, so by Ville's
inequality it ever reaches ``1/alpha`` with probability at most ``alpha``. The sequence
is ``{p : M_n(p) < 1/alpha}``: an interval around ``f/n`` whose ends are found here by
Newton's method. It depends only on ``(f, n)``, so counts may arrive in batches of any size
and in any order. Its width shrinks like ``sqrt(log(n) / n)``: about 1.5 to 2 times a
fixed-sample interval of the same level, the price of looking as often as one likes.

Pure functions of integers: no clock, no I/O.
"""

from __future__ import annotations

import math
from typing import NamedTuple

_NEWTON_STEPS = 60
_LOG_BETA_HALF_HALF = math.log(math.pi)  # log B(1/2, 1/2)
_TOLERANCE = 1e-12


class Bounds(NamedTuple):
    low: float
    high: float


def _log_mixture(events: int, trials: int) -> float:
    """log of the Beta(1/2, 1/2) mixture's probability of the counts (any order)."""
    return (
        math.lgamma(0.5 + events)
        + math.lgamma(0.5 + trials - events)
        - math.lgamma(1.0 + trials)
        - _LOG_BETA_HALF_HALF
    )


def rate_bounds(events: int, trials: int, alpha: float) -> Bounds:
    """The confidence sequence for a rate after ``events`` in ``trials``, at level
    ``1 - alpha``: with probability at least ``1 - alpha`` the true rate lies within the
    bounds at every sample size at once. ``(0, 1)`` when there are no trials."""
    return Bounds(lower_bound(events, trials, alpha), upper_bound(events, trials, alpha))


def lower_bound(events: int, trials: int, alpha: float) -> float:
    """The lower end of ``rate_bounds`` (computed alone when only it is needed)."""
    level = _level(events, trials, alpha)
    return 0.0 if events == 0 else math.exp(_outer_root(events, trials - events, level))


def upper_bound(events: int, trials: int, alpha: float) -> float:
    """The upper end of ``rate_bounds``."""
    level = _level(events, trials, alpha)
    misses = trials - events
    return 1.0 if misses == 0 else -math.expm1(_outer_root(misses, events, level))


def _level(events: int, trials: int, alpha: float) -> float:
    """A rate p is inside while log M_n(p) < log(1/alpha), that is while the counts' log
    likelihood at p, f log p + (n - f) log(1 - p), is above this level. The likelihood
    peaks at f/n, which is always inside, and falls off to either side."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    if trials < 0 or not 0 <= events <= trials:
        raise ValueError(f"need 0 <= events <= trials, got {events} of {trials}")
    if trials == 0:
        return math.inf  # nothing is excluded: (0, 1)
    return _log_mixture(events, trials) - math.log(1 / alpha)


def _outer_root(a: int, b: int, level: float) -> float:
    """The u < 0 where a*u + b*log(1 - e^u) = level, approached from below.

    With u = log p this is the lower end of the interval (a events, b misses); with
    u = log(1 - p) and the counts swapped, the upper end. The function is concave and
    increasing up to the peak, so Newton's method started below the root climbs to it
    without ever passing it: every iterate is outside the interval, and the bound errs
    on the side of being wider. In u the function is nearly linear for small rates,
    which is where canaries live, so a few steps suffice."""
    u = level / a - 1.0  # a*u alone is below the level there, and b*log(1 - e^u) <= 0
    for _ in range(_NEWTON_STEPS):
        e = math.exp(u)
        value = a * u + b * math.log1p(-e) - level
        if value >= 0:  # only by rounding: the root is here
            break
        slope = a - b * e / (1.0 - e)
        step = -value / slope
        u += step
        if step < _TOLERANCE:
            break
    return u
