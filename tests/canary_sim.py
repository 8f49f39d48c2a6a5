"""Whole canaries simulated against the real decision rule (``gateway.core.canary``).

A simulated canary runs as the controller runs one: every evaluation interval, the
requests that arrived (Poisson around the route's traffic) are split by the current
weight, each variant's failures are drawn at its failure rate, the counts are added to
the canary's and the step's totals, and ``decide`` and ``apply`` move it on. It ends
when the canary does (rolled back, awaiting promotion, promoted) or at a horizon.

Module-level functions of plain values, so that a process pool can run settings side
by side (spawned: they import this module afresh).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.config import CanaryConfig
from gateway.controller.canaries import policy_of
from gateway.core.canary import (
    Action,
    Counts,
    Evidence,
    Policy,
    State,
    Status,
    apply,
    decide,
    start,
)

DEFAULT_POLICY = policy_of(CanaryConfig())
ENDED = frozenset({State.ROLLED_BACK, State.AWAITING_PROMOTION, State.PROMOTED})
EVALUATION_SECONDS = CanaryConfig().evaluation_interval_seconds


@dataclass(frozen=True, slots=True)
class Outcome:
    state: State
    reason: str  # of the last decision
    challenger_requests: int  # when it ended (or at the horizon)
    evaluations: int
    ended: bool  # False: still running at the horizon


def simulate(
    policy: Policy,
    champion_rate: float,
    challenger_rate: float,
    per_step: float,
    rng: np.random.Generator,
    horizon_steps: int,
) -> Outcome:
    """One canary with ``per_step`` requests to the route per step interval on average."""
    status = start(Status(), policy, 0.0, "sim", "challenger")
    per_evaluation = per_step * EVALUATION_SECONDS / policy.step_interval_seconds
    evaluations = int(horizon_steps * policy.step_interval_seconds / EVALUATION_SECONDS)
    arrivals = rng.poisson(per_evaluation, evaluations).tolist()
    binomial = rng.binomial
    champion = challenger = step_champion = step_challenger = Counts()
    now = 0.0
    for i, total in enumerate(arrivals):
        now += EVALUATION_SECONDS
        to_challenger = int(binomial(total, status.weight)) if total else 0
        to_champion = total - to_challenger
        new_champion = Counts(
            to_champion, int(binomial(to_champion, champion_rate)) if to_champion else 0
        )
        new_challenger = Counts(
            to_challenger, int(binomial(to_challenger, challenger_rate)) if to_challenger else 0
        )
        champion += new_champion
        challenger += new_challenger
        step_champion += new_champion
        step_challenger += new_challenger
        evidence = Evidence(
            champion, challenger, step_champion, step_challenger, status.step_started,
            step_weight=status.weight,
        )  # fmt: skip
        decision = decide(evidence, policy, now)
        if decision.action is Action.HOLD and decision.reason.value == status.reason:
            continue  # the same hold again: nothing to move on (and building it is slow)
        step = status.step
        status = apply(status, decision, policy, now)
        if status.state in ENDED:
            return Outcome(status.state, status.reason, challenger.requests, i + 1, True)
        if status.step != step:
            step_champion = step_challenger = Counts()
    return Outcome(status.state, status.reason, challenger.requests, evaluations, False)


def run_setting(
    champion_rate: float,
    challenger_rate: float,
    per_step: float,
    canaries: int,
    seed: int,
    horizon_steps: int = 30,
) -> list[Outcome]:
    """``canaries`` independent canaries at the default configuration."""
    rng = np.random.default_rng(seed)
    return [
        simulate(DEFAULT_POLICY, champion_rate, challenger_rate, per_step, rng, horizon_steps)
        for _ in range(canaries)
    ]
