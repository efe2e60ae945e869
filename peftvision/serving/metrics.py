"""`GET /metrics`: what the server did, in Prometheus' text format (prometheus-client).

Label values come only from the server's own vocabulary -- endpoint names, loaded adapter names, HTTP
statuses -- never from what a client typed, so no client can grow the number of series without bound.
"""

from __future__ import annotations

import time
from typing import Any, Callable

# latency from arrival to answer: one batch of the real ViT-Tiny takes ~0.6 s on 2 cores, queues add more
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def endpoint_of(path: str) -> str:
    """The endpoint a path belongs to, from a fixed set (an unknown path is "other")."""
    if path == "/predict":
        return "predict"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2_infer"
    if path.startswith("/v2"):
        return "v2"
    if path.startswith("/adapters"):
        return "adapters"
    return path.strip("/") if path in ("/health", "/metrics") else "other"


class Metrics:
    """The server's counters, histograms and gauges in a registry of its own (several apps in one
    process, as in the tests, do not collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("peftvision_requests", "HTTP requests answered, by endpoint, adapter and status",
                                ["endpoint", "adapter", "status"], registry=self.registry)
        self.latency = Histogram("peftvision_request_seconds", "seconds from a request's arrival to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("peftvision_batch_size", "images per backbone pass", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.batch_seconds = Histogram("peftvision_batch_seconds", "seconds per backbone pass",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("peftvision_queue_depth", "images decoded and waiting for a batch",
                                 registry=self.registry)
        self.in_flight = Gauge("peftvision_requests_in_flight", "inference requests admitted and not yet answered",
                               registry=self.registry)
        self.adapters = Gauge("peftvision_adapters_loaded", "adapters being served", registry=self.registry)

    def watch(self, queue_depth: Callable[[], float], in_flight: Callable[[], float], adapters: Callable[[], float]) -> None:
        """Gauges read when scraped, from the objects that own the numbers."""
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)
        self.adapters.set_function(adapters)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Observe:
    """ASGI middleware: counts every HTTP answer by endpoint, adapter (`request.state.adapter`, set by
    a handler once it knows the adapter is loaded) and status, and times it."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = endpoint_of(scope.get("path", ""))
            adapter = scope.get("state", {}).get("adapter", "")  # request.state writes into this dict
            self.metrics.requests.labels(endpoint, adapter, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
