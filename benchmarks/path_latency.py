"""The cost of Roundhouse's request path alone: client -> Serve's HTTP front -> ingress -> model
replica and back.

Runs the app with the tests' fake engine (tests/fake_engine.py: zero prefill time, so nothing but
the path is measured) and times sequential requests from a client on the same machine: time to
first streamed byte and the full non-streaming round trip. Serve's transport settings are the
variable: each variant is a Ray cluster started with its own environment (`default`: Serve's
Python HTTP proxy and Ray actor calls between deployments; `throughput`: Ray Serve's
throughput-optimized mode, `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: the ingress replica serves HTTP
itself, deployments call each other over gRPC, user code runs on the replica's event loop;
`haproxy`: the same with HAProxy in front, `RAY_SERVE_ENABLE_HA_PROXY=1`). Variants are run
interleaved over rounds (A B C A B C ...) and each one's median over rounds is reported with the
spread. Writes benchmarks/results/path_latency.json.

    python benchmarks/path_latency.py [--requests 300] [--rounds 3] [--variants default,haproxy]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PORT = 18103
sys.path.insert(0, str(REPO))
from serve_app.app import SERVE_TRANSPORT_ENV, transport_ports_env  # noqa: E402

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # What `make serve` starts Ray with (`roundhouse ray-env`), on ports of this benchmark's own.
    "haproxy": SERVE_TRANSPORT_ENV | transport_ports_env(20430, 21800),
}
WARMUP = 20


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


def measure(requests: int) -> dict[str, Any]:
    """One variant, in this process (its environment set by the parent): deploys, times,
    shuts down."""
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import serve_config

    # The replicas import the fake engine from the repository's tests package.
    ray.init(address="local", include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        document = serve_config({"models": [{"name": "chat", "model": "fake", "pinned": True,
                                             "engine_kwargs": {"tokens_per_s": 100000}}]},
                                PORT, import_path="tests.fake_engine:build_app")
        serve_start(http_options={"host": "127.0.0.1", "port": PORT}).deploy_apps(
            ServeDeploySchema.model_validate(document))
        url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1}
        _wait_serving(url, body)
        first_byte: list[float] = []
        round_trip: list[float] = []
        with httpx.Client(timeout=30) as client:
            for i in range(requests + WARMUP):
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
                if i >= WARMUP:
                    first_byte.append(ttfb * 1000)
                    round_trip.append(rtt * 1000)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"stream_first_byte_ms": {"p50": statistics.median(first_byte),
                                     "p99": _percentile(first_byte, 0.99)},
            "non_stream_round_trip_ms": {"p50": statistics.median(round_trip),
                                         "p99": _percentile(round_trip, 0.99)}}


def _run_variant(name: str, requests: int) -> dict[str, Any]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           **VARIANTS[name]}
    out = subprocess.run([sys.executable, __file__, "--measure", "--requests", str(requests)],
                         env=env, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="default,throughput,haproxy")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # one variant, in a process of its own
        print(json.dumps(measure(args.requests)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - VARIANTS.keys()
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        rounds.append({v: _run_variant(v, args.requests) for v in variants})
        print(f"round {r + 1}: " + ", ".join(
            f"{v} {rounds[-1][v]['stream_first_byte_ms']['p50']:.2f} ms" for v in variants),
            flush=True)
    keys = ("stream_first_byte_ms", "non_stream_round_trip_ms")
    summary = {v: {k: {q: {"median": statistics.median(r[v][k][q] for r in rounds),
                           "min": min(r[v][k][q] for r in rounds),
                           "max": max(r[v][k][q] for r in rounds)}
                       for q in ("p50", "p99")} for k in keys} for v in variants}
    report = {"benchmark": "path_latency", "requests": args.requests, "rounds": args.rounds,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "variants": {v: VARIANTS[v] for v in variants},
              "summary": summary, "per_round": rounds}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "path_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'variant':<12} {'measure':<26} {'p50 ms (min..max)':>22} {'p99 ms':>8}")
    for v in variants:
        for k in keys:
            p50, p99 = summary[v][k]["p50"], summary[v][k]["p99"]
            print(f"{v:<12} {k:<26} {p50['median']:>8.2f} ({p50['min']:.2f}..{p50['max']:.2f})"
                  f" {p99['median']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
