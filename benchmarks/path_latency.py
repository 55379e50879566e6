"""The cost of Roundhouse's request path alone: proxy -> ingress -> model replica and back.

Runs the app with the test's fake engine (tests/fake_engine.py: zero prefill time, so nothing but
the path is measured) and
times sequential requests from a client on the same machine: time to first streamed byte and
the full non-streaming round trip. Writes benchmarks/results/path_latency.json.

    python benchmarks/path_latency.py [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PORT = 18103


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _wait_serving(url: str, body: dict[str, object], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.post(url, json=body, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # readiness polling interval
    raise TimeoutError(f"{url} not serving after {timeout_s} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import serve_config

    # The replicas import the fake engine from the repository's tests package.
    ray.init(address="local", include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    document = serve_config({"models": [{"name": "chat", "model": "fake", "pinned": True,
                                         "engine_kwargs": {"tokens_per_s": 100000}}]}, PORT,
                            import_path="tests.fake_engine:build_app")
    serve_start(http_options={"host": "127.0.0.1", "port": PORT}).deploy_apps(
        ServeDeploySchema.model_validate(document))
    url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    _wait_serving(url, body)
    first_byte: list[float] = []
    round_trip: list[float] = []
    with httpx.Client(timeout=30) as client:
        for i in range(args.requests + 20):  # the first 20 warm the path up
            start = time.perf_counter()
            with client.stream("POST", url, json={**body, "stream": True}) as resp:
                chunks = resp.iter_raw()
                next(chunks)
                ttfb = time.perf_counter() - start
                for _ in chunks:
                    pass
            start = time.perf_counter()
            client.post(url, json=body).raise_for_status()
            rtt = time.perf_counter() - start
            if i >= 20:
                first_byte.append(ttfb * 1000)
                round_trip.append(rtt * 1000)
    serve.shutdown()
    ray.shutdown()
    report = {
        "benchmark": "path_latency",
        "requests": args.requests,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stream_first_byte_ms": {"p50": statistics.median(first_byte),
                                 "p99": _percentile(first_byte, 0.99)},
        "non_stream_round_trip_ms": {"p50": statistics.median(round_trip),
                                     "p99": _percentile(round_trip, 0.99)},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "path_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'measure':<28} {'p50 ms':>8} {'p99 ms':>8}")
    for key in ("stream_first_byte_ms", "non_stream_round_trip_ms"):
        print(f"{key:<28} {report[key]['p50']:>8.2f} {report[key]['p99']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
