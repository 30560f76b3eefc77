"""Prometheus metrics at ``/metrics`` (prometheus-client), named as vLLM's and llama.cpp's users expect.

Three sources, one registry per app (two servers in one process never mix their series):

* HTTP: ``llama3_requests_total{route, method, status}`` from a plain ASGI middleware (streaming untouched);
  the route is the matched path template, so ids in paths never make new series.
* Latency, from the engine's thread as tokens appear (``EngineObserver``): time to first token (from
  submission), time per output token (between a sequence's tokens; a step that yields several tokens, as
  prompt lookup does, counts each at its share), and each sequence's end-to-end time by finish reason.
* Engine state, read at scrape time from ``Engine.stats()``: running and waiting sequences, KV-cache slots in
  use, prompt and generated tokens, decode steps, prefix-cache hits and reused tokens, prompt-lookup drafts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsMiddleware"]

# Seconds. Time to first token spans a cached one-token prompt to a long queue; per-token latency a fused CPU
# step to a step shared by a full batch.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# Engine.stats() counters: metric name, help.
_COUNTERS = {
    "prompt_tokens": ("llama3_prompt_tokens", "Prompt tokens of admitted sequences"),
    "generated_tokens": ("llama3_generation_tokens", "Generated tokens"),
    "decode_steps": ("llama3_decode_steps", "Batched decode steps run"),
    "prefix_cache_hits": ("llama3_prefix_cache_hits", "Admissions that reused cached prompt chunks"),
    "prefix_cache_tokens": ("llama3_prefix_cache_tokens", "Prompt tokens not prefilled thanks to the prefix cache"),
    "draft_tokens": ("llama3_draft_tokens", "Prompt-lookup draft tokens fed to decode steps"),
    "accepted_draft_tokens": ("llama3_accepted_draft_tokens", "Prompt-lookup draft tokens the model confirmed"),
}


class _EngineCollector(Collector):
    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self) -> Iterator[Any]:
        stats = self.engine.stats()
        labels = ["model_name"]
        for key, (name, text) in _COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=labels)
            family.add_metric([self.model_name], stats.get(key, 0))
            yield family
        gauges = {
            "llama3_requests_running": ("Sequences in a KV-cache slot (prefilling or decoding)", stats["running"]),
            "llama3_requests_waiting": ("Sequences waiting for a slot", stats["waiting"]),
            "llama3_kv_cache_slots_used": ("KV-cache slots holding a sequence", stats["running"]),
            "llama3_kv_cache_slots": ("KV-cache slots (--max-batch-size)", stats["max_batch_size"]),
            "llama3_queue_limit": ("Sequences that may wait beyond the slots (--max-queue)", stats["max_queue"]),
        }
        for name, (text, value) in gauges.items():
            family = GaugeMetricFamily(name, text, labels=labels)
            family.add_metric([self.model_name], value)
            yield family


class Metrics:
    """The registry of one server, and the ``EngineObserver`` the engine reports token timings to."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.requests = Counter("llama3_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.ttft = Histogram("llama3_time_to_first_token_seconds", "Submission to first generated token",
                              ["model_name"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("llama3_time_per_output_token_seconds", "Time between a sequence's tokens",
                              ["model_name"], buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("llama3_e2e_sequence_seconds", "Submission to the end of a sequence, by finish reason",
                             ["model_name", "finish_reason"], buckets=E2E_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine, model_name))

    # -- EngineObserver (called on the engine's thread) ----------------------------------------------------

    def first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def next_tokens(self, count: int, seconds: float) -> None:
        per_token = seconds / count
        child = self.tpot.labels(self.model_name)
        for _ in range(count):
            child.observe(per_token)

    def finished(self, reason: str, seconds: float) -> None:
        self.e2e.labels(self.model_name, reason).observe(seconds)

    # -- exposition ----------------------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP response by route template, method and status (a plain ASGI middleware, so
    streaming responses and disconnect detection pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def _template(self, scope: Scope) -> str:
        # Matched here rather than read from the scope: a request the key middleware refuses never reaches
        # the router, and it still counts under its route.
        partial = "unmatched"
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", "unmatched")
            if match == Match.PARTIAL and partial == "unmatched":  # the path, another method (a 405)
                partial = getattr(route, "path", "unmatched")
        return partial

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before the response started ends as Starlette's 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(self._template(scope), scope["method"], str(status)).inc()
