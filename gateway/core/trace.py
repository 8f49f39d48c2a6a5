"""Request traces in the AIBrix v3 layout, as pure bookkeeping.

Nothing here reads a clock or does I/O: callers pass the time in as float seconds since
the epoch, and the shell (``gateway.tracing``) ships the finished windows to Redis.

One window of one model becomes this JSON object, stored under
``{key_prefix}:{model}_request_trace_{window_end}``::

    {"<in>:<out>": count, ..., "meta_interval_sec": 10, "meta_pending_reqs": P,
     "meta_precision": 10, "meta_total_reqs": N, "meta_v": 3}

AIBrix's ``GatewayLoadReader`` reads it back: it skips ``meta_*`` keys, requires every
other key to match ``^\\d+:\\d+$`` and every value to be a non-zero integer, divides the
bucket numbers by ``meta_precision`` to get log2(tokens), and reports
``meta_total_reqs / meta_interval_sec`` as the arrival rate. It names a key by the *end* of
the window (its Go gateway rounds "now" down just after the boundary), so do we.
"""

from __future__ import annotations

import bisect
import math
from typing import NamedTuple

import orjson

from gateway.core.usage import usage_of_answers

TRACE_VERSION = 3
# Whole answers kept (by reference) before their token counts are read: at most this many
# for all models of a writer together, so a few hundred kB for chat-sized answers.
ANSWER_BATCH = 64
# Buckets are log2(tokens) in steps of 1/PRECISION; AIBrix divides by meta_precision.
PRECISION = 10

META_VERSION = "meta_v"
META_PRECISION = "meta_precision"
META_INTERVAL = "meta_interval_sec"
META_TOTAL = "meta_total_reqs"
META_PENDING = "meta_pending_reqs"
# Fields that describe the format rather than count anything: merging keeps them.
CONSTANT_META = frozenset({META_VERSION, META_PRECISION, META_INTERVAL})

TraceSnapshot = dict[str, int]


def round_half_away(x: float) -> int:
    """Round to the nearest integer, halves away from zero (Go's ``math.Round``).

    ``math.floor(x + 0.5)`` is wrong for 0.49999999999999994 (the addition rounds up to
    1.0), so compare the fractional part instead: ``x - floor(x)`` is exact in binary
    floating point.
    """
    if x < 0:
        return -round_half_away(-x)
    whole = math.floor(x)
    return whole + 1 if x - whole >= 0.5 else whole


# Bucket of t tokens is round_half_away(10 * log2(t)). Evaluated exactly:
#     k - 1/2 <= 10 log2 t < k + 1/2   <=>   2**(2k-1) <= t**20 < 2**(2k+1)
# so bucket(t) = bit_length(t**20) // 2. A half-way point would need t**20 == 2**odd,
# impossible for an integer t, so integer token counts never hit a tie and the float
# formula AIBrix's Go gateway uses (math.Round(math.Log2(t) / 0.1)) agrees with the
# exact one as long as float error stays far below the closest approach to a tie (about
# 2.8e-7 below 2**22 tokens, at t = 1432397; float error there is ~1e-13). We use the
# exact form, precomputed as the smallest token count of each bucket so the per-request
# cost is one C-level bisect rather than a log or a 20th power.
_TABLE_LIMIT = 1 << 63


def exact_bucket(tokens: int) -> int:
    """The bucket by exact integer arithmetic (the reference the table is built from)."""
    return (tokens**20).bit_length() // 2 if tokens > 0 else 0


def _first_token_count_of_bucket(k: int) -> int:
    """Smallest t with t**20 >= 2**(2k-1), i.e. the first token count in bucket >= k."""
    target = 1 << (2 * k - 1)
    t = max(1, int(2.0 ** ((2 * k - 1) / 20)))
    while t**20 < target:
        t += 1
    while t > 1 and (t - 1) ** 20 >= target:
        t -= 1
    return t


def _build_thresholds() -> list[int]:
    out: list[int] = []
    k = 1
    while True:
        t = _first_token_count_of_bucket(k)
        if t >= _TABLE_LIMIT:
            return out
        out.append(t)
        k += 1


_THRESHOLDS = _build_thresholds()
# Buckets of the token counts most answers have, by index: a bisect costs ~20 times more.
_SMALL_COUNTS = 1 << 15
_SMALL_BUCKETS = tuple(bisect.bisect_right(_THRESHOLDS, t) for t in range(_SMALL_COUNTS))


def token_bucket(tokens: int) -> int:
    """``int(round_half_away(log2(tokens) / 0.1))``; 0 for 0 (and for 1) tokens.

    Negative counts (a broken ``usage`` block) are treated as 0 rather than raising: a
    bad answer from a model server must not break the request that carried it.
    """
    if 0 <= tokens < _SMALL_COUNTS:
        return _SMALL_BUCKETS[tokens]
    if tokens < _TABLE_LIMIT:
        return bisect.bisect_right(_THRESHOLDS, tokens)
    return exact_bucket(tokens)


def window_end(now: float, interval: int) -> int:
    """End of the interval-aligned window holding ``now``.

    Windows are ``[k*interval, (k+1)*interval)``: an instant exactly on a boundary opens
    the next window.
    """
    return (math.floor(now / interval) + 1) * interval


def trace_key(key_prefix: str, model: str, end: int) -> str:
    return f"{key_prefix}:{model}_request_trace_{end}"


class FinishedWindow(NamedTuple):
    window_end: int
    trace: TraceSnapshot


# Bucket pairs are kept as one int while counting (no string formatting per request);
# the "<in>:<out>" text is made once per window. Buckets of int64 token counts are < 640.
_PAIR_SHIFT = 20
_PAIR_MASK = (1 << _PAIR_SHIFT) - 1


def _pair_text(pair: int) -> str:
    return f"{pair >> _PAIR_SHIFT}:{pair & _PAIR_MASK}"


class AnswerBatch:
    """Whole answers that finished, their token counts not read yet, of every model that
    shares the batch (one per trace writer).

    One batch for all models keeps what is held bounded by ``ANSWER_BATCH`` however many
    models there are, and reads it while it is still in the CPU's caches. Any model's
    window closing (or being shown) reads the whole batch first; every answer in it
    then still counts into the window of its own model that was open when it finished,
    because that window cannot have closed without reading the batch.
    """

    __slots__ = ("answers", "traces")

    def __init__(self) -> None:
        self.traces: list[ModelTrace] = []
        self.answers: list[bytes] = []

    def count(self) -> None:
        """Read every held answer's ``usage`` into its model's open window."""
        traces, answers = self.traces, self.answers
        self.traces, self.answers = [], []
        for trace, (in_tokens, out_tokens) in zip(
            traces, usage_of_answers(answers), strict=True
        ):
            # token_bucket() inlined for the usual counts, as in ModelTrace.done().
            if 0 <= in_tokens < _SMALL_COUNTS and 0 <= out_tokens < _SMALL_COUNTS:
                pair = (_SMALL_BUCKETS[in_tokens] << _PAIR_SHIFT) | _SMALL_BUCKETS[out_tokens]
            else:
                pair = (token_bucket(in_tokens) << _PAIR_SHIFT) | token_bucket(out_tokens)
            counts = trace._counts  # the open window of the answer's own model
            counts[pair] = counts.get(pair, 0) + 1


class ModelTrace:
    """The trace of one model: the open window, the live pending gauge, closed windows.

    ``add`` counts an arrival into the window open at ``now``; ``done`` counts the
    request's token bucket pair into the window open when it finishes. A request that
    straddles a boundary is therefore counted once as an arrival in the first window and
    once as a completion in the second, with no per-request state to carry between
    them, so the handle a caller keeps can simply be this object.

    Windows close lazily: the first call at or after the boundary (including
    ``take_finished``) closes the open window and records the in-flight count at that
    moment as its ``meta_pending_reqs``. Calls arrive in time order on one event loop,
    so that count is exactly the number in flight at the boundary. Time that moves
    backwards (a wall-clock step) keeps counting into the open window.
    """

    __slots__ = (
        "_answers",
        "_boundary",
        "_counts",
        "_end",
        "_finished",
        "_total",
        "interval",
        "pending",
    )

    def __init__(self, interval: int, now: float, answers: AnswerBatch | None = None) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval = interval
        self.pending = 0
        self._end = window_end(now, interval)
        # The same instant as a float: comparing a float clock with it stays on the fast
        # path (float against int takes a slower one), and every request compares.
        self._boundary = float(self._end)
        self._total = 0
        self._counts: dict[int, int] = {}
        self._finished: list[FinishedWindow] = []
        # Whole answers that finished, their tokens not read yet (shared with the other
        # models of the same writer).
        self._answers = answers if answers is not None else AnswerBatch()

    def add(self, now: float) -> None:
        if now >= self._boundary:
            self._close(now)
        self._total += 1
        self.pending += 1

    def done(self, now: float, in_tokens: int, out_tokens: int) -> None:
        if now >= self._boundary:
            self._close(now)
        # token_bucket() inlined for the usual counts: this runs on every request.
        if 0 <= in_tokens < _SMALL_COUNTS and 0 <= out_tokens < _SMALL_COUNTS:
            pair = (_SMALL_BUCKETS[in_tokens] << _PAIR_SHIFT) | _SMALL_BUCKETS[out_tokens]
        else:
            pair = (token_bucket(in_tokens) << _PAIR_SHIFT) | token_bucket(out_tokens)
        counts = self._counts
        counts[pair] = counts.get(pair, 0) + 1
        self.pending -= 1

    def done_answer(self, now: float, answer: bytes) -> None:
        """``done`` with the token counts still inside ``answer`` (its ``usage``).

        Reading them is left for later, a batch at a time: in a loop over answers the
        parse runs with warm caches, where one parse per request between everything else
        a request does costs several times more. The answers are read before the window
        they finished in is closed or shown, so each still counts exactly there."""
        if now >= self._boundary:
            self._close(now)
        batch = self._answers
        batch.traces.append(self)
        answers = batch.answers
        answers.append(answer)
        self.pending -= 1
        if len(answers) >= ANSWER_BATCH:
            batch.count()

    def discard(self, now: float) -> None:
        """End a request that produced no answer: it leaves the pending gauge only."""
        if now >= self._boundary:
            self._close(now)
        self.pending -= 1

    def take_finished(self, now: float) -> list[FinishedWindow]:
        """Closed windows that saw traffic, oldest first; each is returned once."""
        if now >= self._boundary:
            self._close(now)
        out, self._finished = self._finished, []
        return out

    def take_open(self) -> FinishedWindow | None:
        """Close the open window early (shutdown): its counts so far, or None if idle.

        The window keeps its end, so a later write of the rest of it merges.
        """
        window = self._snapshot_open()
        self._counts = {}
        self._total = 0
        return window

    def peek_open(self) -> FinishedWindow | None:
        return self._snapshot_open()

    def _close(self, now: float) -> None:
        window = self._snapshot_open()
        if window is not None:
            self._finished.append(window)
        self._counts = {}
        self._total = 0
        self._end = window_end(now, self.interval)
        self._boundary = float(self._end)

    def _snapshot_open(self) -> FinishedWindow | None:
        if self._answers.answers:
            self._answers.count()
        if not self._total and not self._counts:
            return None
        trace: TraceSnapshot = {_pair_text(p): n for p, n in self._counts.items()}
        trace[META_VERSION] = TRACE_VERSION
        trace[META_PRECISION] = PRECISION
        trace[META_INTERVAL] = self.interval
        trace[META_TOTAL] = self._total
        # A done() without its add() (a caller bug) must not publish a negative gauge.
        trace[META_PENDING] = max(self.pending, 0)
        return FinishedWindow(self._end, trace)


def serialize(snapshot: TraceSnapshot) -> bytes:
    """Compact JSON with sorted keys, byte-identical to AIBrix's Go ``json.Marshal``."""
    return orjson.dumps(snapshot, option=orjson.OPT_SORT_KEYS)


def merge(existing: TraceSnapshot, incoming: TraceSnapshot) -> TraceSnapshot:
    """What several replicas writing one window add up to.

    Bucket counts, totals and pending gauges add (each replica reports only its own
    requests); the format fields are taken from the incoming write. The Redis-side merge
    script in ``gateway.tracing`` implements the same rule.
    """
    out = dict(existing)
    for key, value in incoming.items():
        if key in CONSTANT_META:
            out[key] = value
        else:
            out[key] = out.get(key, 0) + value
    return out
