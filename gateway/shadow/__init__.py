"""Shadow traffic: a sample of champion-answered requests mirrored to a shadow target off
the response path, the answers compared, the outcomes counted per route."""

from __future__ import annotations

from gateway.shadow.bodies import BoundedCopy, decode_body, tee_stream
from gateway.shadow.policy import ShadowPolicy
from gateway.shadow.runner import SHADOW_HEADER, MirroredRequest, ShadowRunner

__all__ = [
    "SHADOW_HEADER",
    "BoundedCopy",
    "MirroredRequest",
    "ShadowPolicy",
    "ShadowRunner",
    "decode_body",
    "tee_stream",
]
