"""The canary controller: per route, a leader that ramps the challenger from what every
gateway process counted, through the state store (see ``canaries``)."""

from __future__ import annotations

from gateway.controller.canaries import CanaryController, CanaryError

__all__ = ["CanaryController", "CanaryError"]
