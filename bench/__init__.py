"""Benchmark harness: the gateway against a minimal aiohttp proxy and nginx (see README)."""
