"""Roundhouse's metrics, recorded with `ray.serve.metrics` so they reach Ray's Prometheus
endpoint (and the dashboard's Metrics view) with Serve's own `deployment`, `replica` and
`application` tags added. Prometheus names carry Ray's `ray_` prefix and, for counters, the
`_total` suffix: `roundhouse_requests` is scraped as `ray_roundhouse_requests_total`.

Each process makes its recorder once (`ingress()`, `model()`, `controller()`); the metric objects
are created lazily, so importing this module costs nothing and tests without Ray can pass
`NullRecorder`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

# Seconds; TTFT and latency on a CPU stretch to minutes, so the top buckets are wide.
LATENCY_BUCKETS: list[float] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
LOAD_BUCKETS: list[float] = [1, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200]
STATES = ("cold", "loading", "active", "draining", "failed")


def _counter(name: str, description: str, tags: tuple[str, ...]) -> Any:
    from ray.serve import metrics

    return metrics.Counter(name, description=description,
                           tag_keys=tags)  # type: ignore[arg-type]  # Ray stubs: tuple[str]


def _gauge(name: str, description: str, tags: tuple[str, ...]) -> Any:
    from ray.serve import metrics

    return metrics.Gauge(name, description=description,
                           tag_keys=tags)  # type: ignore[arg-type]  # Ray stubs: tuple[str]


def _histogram(name: str, description: str, buckets: Sequence[float],
               tags: tuple[str, ...]) -> Any:
    from ray.serve import metrics

    return metrics.Histogram(name, description=description, boundaries=list(buckets),
                             tag_keys=tags)  # type: ignore[arg-type]  # Ray stubs: tuple[str]


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = _counter("roundhouse_requests",
                                 "Requests by model, route rule and HTTP status.",
                                 ("model", "rule", "status"))
        self.ttft = _histogram("roundhouse_ttft_seconds",
                               "Time to first token of streamed responses, at the ingress.",
                               LATENCY_BUCKETS, ("model",))
        self.latency = _histogram("roundhouse_request_latency_seconds",
                                  "End-to-end request latency at the ingress.",
                                  LATENCY_BUCKETS, ("model", "stream"))
        self.input_tokens = _counter("roundhouse_input_tokens", "Prompt tokens served.",
                                     ("model",))
        self.output_tokens = _counter("roundhouse_output_tokens", "Completion tokens served.",
                                      ("model",))
        self.refusals = _counter("roundhouse_refusals",
                                 "Requests refused by rate limits, auth or admission.",
                                 ("model", "reason"))

    def request(self, model: str, rule: str, status: int) -> None:
        self.requests.inc(tags={"model": model, "rule": rule, "status": str(status)})

    def finished(self, model: str, stream: bool, latency_s: float) -> None:
        self.latency.observe(latency_s, tags={"model": model, "stream": str(stream).lower()})

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"model": model})

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self.input_tokens.inc(prompt, tags={"model": model})
        if completion:
            self.output_tokens.inc(completion, tags={"model": model})

    def refused(self, model: str, reason: str) -> None:
        self.refusals.inc(tags={"model": model, "reason": reason})


class ModelMetrics:
    def __init__(self) -> None:
        self.queued = _gauge("roundhouse_queued_requests",
                             "Requests waiting for KV cache room, per model.", ("model",))
        self.reserved = _gauge("roundhouse_kv_reserved_tokens",
                               "KV tokens reserved by admitted requests, per model.", ("model",))
        self.budget = _gauge("roundhouse_kv_budget_tokens",
                             "KV tokens admission may reserve, per model.", ("model",))
        self.in_flight = _gauge("roundhouse_requests_in_flight",
                                "Requests running in the model replica.", ("model",))

    def admission(self, model: str, stats: dict[str, int]) -> None:
        tags = {"model": model}
        self.queued.set(stats.get("queued_requests", 0), tags=tags)
        self.reserved.set(stats.get("kv_reserved_tokens", 0), tags=tags)
        self.budget.set(stats.get("kv_budget_tokens", 0), tags=tags)
        self.in_flight.set(stats.get("in_flight", 0), tags=tags)


class ControllerMetrics:
    def __init__(self) -> None:
        self.state = _gauge("roundhouse_model_state",
                            "1 for the model's current residency state, 0 for the others.",
                            ("model", "state"))
        self.load_seconds = _histogram("roundhouse_model_load_seconds",
                                       "Time from a load's start to a serving replica.",
                                       LOAD_BUCKETS, ("model",))
        self.loads = _counter("roundhouse_model_loads", "Model loads started.", ("model",))
        self.evictions = _counter("roundhouse_model_evictions",
                                  "Models drained and stopped to free memory or when idle.",
                                  ("model",))
        self.failures = _counter("roundhouse_model_failures", "Failed model loads.", ("model",))

    def set_state(self, model: str, state: str) -> None:
        for name in STATES:
            self.state.set(1 if name == state else 0, tags={"model": model, "state": name})

    def loaded(self, model: str, seconds: float) -> None:
        self.load_seconds.observe(seconds, tags={"model": model})

    def load_started(self, model: str) -> None:
        self.loads.inc(tags={"model": model})

    def evicted(self, model: str) -> None:
        self.evictions.inc(tags={"model": model})

    def failed(self, model: str) -> None:
        self.failures.inc(tags={"model": model})


class NullControllerMetrics(ControllerMetrics):
    """For the controller's unit tests: records nothing, needs no Ray."""

    def __init__(self) -> None:
        pass

    def set_state(self, model: str, state: str) -> None:
        pass

    def loaded(self, model: str, seconds: float) -> None:
        pass

    def load_started(self, model: str) -> None:
        pass

    def evicted(self, model: str) -> None:
        pass

    def failed(self, model: str) -> None:
        pass


@cache
def ingress() -> IngressMetrics:
    return IngressMetrics()


@cache
def model() -> ModelMetrics:
    return ModelMetrics()


@cache
def controller() -> ControllerMetrics:
    return ControllerMetrics()
