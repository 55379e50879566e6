"""What Roundhouse costs on top of vLLM: the same model, same machine, same run.

Target A is vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`); target B
is Roundhouse (Ray Serve proxy -> ingress -> model replica with AsyncLLM) serving the same model
with the same engine settings; target C is Roundhouse with the gateway on (API key, rate limits,
`"model": "auto"` routing), so B vs C is the gateway's cost, also timed in process. Both are driven by vLLM's serving benchmark
(`vllm.benchmarks.serve`, random dataset, 128 input / 64 output tokens) at concurrency 1 and 16,
one target at a time so they never compete for the two cores.

    python benchmarks/overhead.py [--concurrency 1 16] [--prompts-per-concurrency 4]

Writes benchmarks/results/overhead.json and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MODEL_NAME = "chat"
ENGINE_KWARGS: dict[str, Any] = {"enforce_eager": True, "dtype": "float32",
                                 "max_model_len": 2048}
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
DIRECT_PORT, ROUNDHOUSE_PORT = 18101, 18102
# The gateway run: an API key with limits it never reaches, routing rules, `"model": "auto"`.
GATEWAY_KEY = "rh-overhead-benchmark-key"
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
           "p99_tpot_ms", "completed")


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)  # readiness polling interval
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def _wait_port_free(port: int, timeout_s: float = 120) -> None:
    """The previous server (its Ray proxy outlives `serve run` by a few seconds) must be gone,
    or the next run's readiness checks would be answered by it."""
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.5)  # polling interval while the old server exits
    raise RuntimeError(f"port {port} is still taken after {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def direct_vllm(model_path: str, log: Path) -> Iterator[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(DIRECT_PORT),
           "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048",
           "--disable-log-stats"]
    env = {**os.environ, **ENGINE_ENV}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{DIRECT_PORT}"
        _wait_http(f"{base}/v1/models", 600, proc)
        yield base
    finally:
        _stop(proc)


@contextlib.contextmanager
def roundhouse(log: Path, limits: dict[str, Any] | None = None,
               engine_kwargs: dict[str, Any] | None = None,
               env: dict[str, str] | None = None,
               app_args: dict[str, Any] | None = None) -> Iterator[str]:
    """`serve run` of Roundhouse with the one local model (pinned) as `chat`, waiting until the
    engine answers; `limits` are the model's admission limits, `engine_kwargs` and `env` replace
    ENGINE_KWARGS and ENGINE_ENV (benchmarks/spike.py), `app_args` are more app args (auth,
    routing: the gateway run)."""
    from serve_app.app import serve_config

    model: dict[str, Any] = {"name": MODEL_NAME, "model": "smollm2-135m-instruct",
                             "pinned": True, "engine_kwargs": engine_kwargs or ENGINE_KWARGS,
                             "env": ENGINE_ENV if env is None else env}
    if limits is not None:
        model["limits"] = limits
    config = serve_config({"models": [model], **(app_args or {})}, ROUNDHOUSE_PORT)
    config_path = RESULTS / "roundhouse_bench_config.json"
    config_path.write_text(json.dumps(config))
    _wait_port_free(ROUNDHOUSE_PORT)
    serve_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    serve = str(Path(sys.executable).parent / "serve")
    with log.open("wb") as out:
        proc = subprocess.Popen([serve, "run", str(config_path)], env=serve_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{ROUNDHOUSE_PORT}"
        _wait_http(f"{base}/health", 600, proc)
        # /health answers once the ingress is up; the engine may still be loading.
        _wait_for_completion(base, (app_args or {}).get("auth") and GATEWAY_KEY)
        yield base
    finally:
        _stop(proc)
        config_path.unlink(missing_ok=True)


def _wait_for_completion(base: str, key: str | None = None) -> None:
    body = json.dumps({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}).encode()
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"{base}/v1/completions", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=600) as resp:
        resp.read()


def run_vllm_bench(base: str, tokenizer: str, concurrency: int, num_prompts: int,
                   label: str, model: str = MODEL_NAME, api_key: str | None = None
                   ) -> dict[str, Any]:
    out_dir = RESULTS / "raw"
    out_dir.mkdir(parents=True, exist_ok=True)
    result_file = f"{label}-c{concurrency}.json"
    cmd = [sys.executable, "-c", "import sys; from vllm.benchmarks.serve import add_cli_args, "
           "main; from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
           "p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))",
           "--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions",
           "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
           "--random-input-len", "128", "--random-output-len", "64", "--ignore-eos",
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
           "--seed", "0", "--save-result", "--result-dir", str(out_dir),
           "--result-filename", result_file, "--disable-tqdm", "--num-warmups", "2"]
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    if api_key:
        env["OPENAI_API_KEY"] = api_key  # sent as Authorization: Bearer
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    data = json.loads((out_dir / result_file).read_text())
    return {k: data.get(k) for k in METRICS}


def gateway_args() -> dict[str, Any]:
    from serve_app.auth import hash_key

    return {
        "auth": {"keys": [{"name": "bench", "sha256": hash_key(GATEWAY_KEY),
                           "requests_per_minute": 1_000_000,
                           "tokens_per_minute": 1_000_000_000}]},
        "routing": {"rules": [
            {"name": "quality-high", "when": {"quality": "high"}, "model": MODEL_NAME},
            {"name": "code", "when": {"code": True}, "model": MODEL_NAME},
            {"name": "reasoning", "when": {"reasoning": True}, "model": MODEL_NAME}]},
    }


def gateway_cost_us(tokenizer: str, requests: int = 2000) -> dict[str, dict[str, float]]:
    """The gateway's work per request in the ingress, timed in process on the benchmark's own
    kind of prompts (random tokens, 128 long): key check, both rate-limit buckets, routing."""
    import random

    from transformers import AutoTokenizer

    from serve_app.auth import KeyTable
    from serve_app.config import AppConfig
    from serve_app.policy.ratelimit import RateLimiter
    from serve_app.router import build_router, decide, route_input, routing_view

    config = AppConfig.model_validate({"models": [{"name": MODEL_NAME, "model": "fake"}],
                                       **gateway_args()})
    keys = KeyTable(True, config.auth.keys, config.lookup())
    limiter, router = RateLimiter(), build_router(config)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    rng = random.Random(0)
    prompts = [tok.decode([rng.randrange(tok.vocab_size) for _ in range(128)])
               for _ in range(200)]
    bodies = [{"model": "auto", "prompt": p, "max_tokens": 64} for p in prompts]
    gate: list[float] = []
    routing: list[float] = []
    for i in range(requests):
        body = bodies[i % len(bodies)]
        started = time.perf_counter()
        principal = keys.authenticate(f"Bearer {GATEWAY_KEY}")
        limiter.request(principal.name, principal.limits, started)
        limiter.tokens_left(principal.name, principal.limits, started)
        checked = time.perf_counter()
        view = routing_view(body, "/v1/completions")
        principal.may_use(decide(router, route_input(view, None)).model)
        limiter.charge_tokens(principal.name, principal.limits, 192, started)
        gate.append((checked - started) * 1e6)
        routing.append((time.perf_counter() - checked) * 1e6)

    def pct(samples: list[float]) -> dict[str, float]:
        samples.sort()
        return {"p50": round(samples[len(samples) // 2], 1),
                "p99": round(samples[int(len(samples) * 0.99)], 1)}

    return {"auth_and_limits": pct(gate), "routing": pct(routing)}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompts-per-concurrency", type=int, default=4,
                        help="prompts sent = this x concurrency, at least 16")
    args = parser.parse_args()

    from serve_app.local_models import SMOLLM2_NAME, models_dir

    model_path = str(models_dir() / SMOLLM2_NAME)
    if not Path(model_path).exists():
        print("run `roundhouse prepare-models` (or make bench) first", file=sys.stderr)
        return 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, Any]]] = {"vllm": {}, "roundhouse": {},
                                                     "gateway": {}}
    prompts = {c: max(16, args.prompts_per_concurrency * c) for c in args.concurrency}
    with direct_vllm(model_path, RESULTS / "overhead-vllm.log") as base:
        for c in args.concurrency:
            results["vllm"][str(c)] = run_vllm_bench(base, model_path, c, prompts[c], "vllm")
    with roundhouse(RESULTS / "overhead-roundhouse.log") as base:
        for c in args.concurrency:
            results["roundhouse"][str(c)] = run_vllm_bench(base, model_path, c, prompts[c],
                                                           "roundhouse")
    # Gateway on: every request authenticated, rate-limited (never refused) and routed.
    with roundhouse(RESULTS / "overhead-gateway.log", app_args=gateway_args()) as base:
        for c in args.concurrency:
            results["gateway"][str(c)] = run_vllm_bench(base, model_path, c, prompts[c],
                                                        "gateway", model="auto",
                                                        api_key=GATEWAY_KEY)
    gateway_us = gateway_cost_us(model_path)

    ratios: dict[str, dict[str, float]] = {}
    for c in map(str, args.concurrency):
        d, r = results["vllm"][c], results["roundhouse"][c]
        ratios[c] = {
            "throughput_ratio": r["output_throughput"] / d["output_throughput"],
            "median_ttft_delta_ms": r["median_ttft_ms"] - d["median_ttft_ms"],
            "median_tpot_ratio": r["median_tpot_ms"] / d["median_tpot_ms"],
            "gateway_throughput_ratio": (results["gateway"][c]["output_throughput"]
                                         / r["output_throughput"]),
            "gateway_median_ttft_delta_ms": (results["gateway"][c]["median_ttft_ms"]
                                             - r["median_ttft_ms"]),
        }
    report = {
        "benchmark": "overhead",
        "workload": {"dataset": "random", "input_len": 128, "output_len": 64,
                     "num_prompts": {str(c): n for c, n in prompts.items()},
                     "concurrency": args.concurrency,
                     "model": "SmolLM2-135M-Instruct (float32, enforce_eager, CPU)"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
        "ratios": ratios,
        "gateway_cost_in_process_us": gateway_us,
        "targets": {"throughput_ratio_c16_min": 0.90, "median_ttft_delta_c1_max_ms": 30.0},
    }
    (RESULTS / "overhead.json").write_text(json.dumps(report, indent=2) + "\n")

    header = (f"{'target':<11} {'conc':>4} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'TPOT p50':>9} {'TPOT p99':>9}")
    print(header)
    print("-" * len(header))
    for target in ("vllm", "roundhouse", "gateway"):
        for c in map(str, args.concurrency):
            m = results[target][c]
            print(f"{target:<11} {c:>4} {_fmt(m['output_throughput']):>9} "
                  f"{_fmt(m['median_ttft_ms']):>9} {_fmt(m['p99_ttft_ms']):>9} "
                  f"{_fmt(m['median_tpot_ms']):>9} {_fmt(m['p99_tpot_ms']):>9}")
    print()
    for c, r in ratios.items():
        print(f"concurrency {c}: throughput {r['throughput_ratio']:.3f}x of vLLM, "
              f"median TTFT {r['median_ttft_delta_ms']:+.1f} ms, "
              f"median TPOT {r['median_tpot_ratio']:.3f}x; gateway on: throughput "
              f"{r['gateway_throughput_ratio']:.3f}x of off, median TTFT "
              f"{r['gateway_median_ttft_delta_ms']:+.1f} ms")
    for part, q in gateway_us.items():
        print(f"gateway work per request in process, {part}: p50 {q['p50']} us, "
              f"p99 {q['p99']} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
