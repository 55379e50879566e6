"""Cold starts and swaps: what an on-demand model costs the request that wakes it.

Baseline, same run, same engine settings: start vLLM's own OpenAI server on the local model and
time launch -> first streamed token (the best a "start a server when asked" setup can do).
Roundhouse (configs/local.yaml's models and budget): `chat` pinned, `code` and `reasoning` on
demand, room for one of them.
- cold start: a request for the cold `code` model, nothing to evict: send -> first token;
- swap: a request for the other on-demand model, which evicts the active one: send -> first
  token, and from the controller's decision log the time from the eviction decision to the next
  model serving (split into drain + stop + memory free, and load).

    python benchmarks/cold_start.py [--runs 2]

Writes benchmarks/results/cold_start.json and prints the table. Target: Roundhouse's cold start
within 1.2x of the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import ENGINE_ENV, _stop  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DIRECT_PORT, ROUNDHOUSE_PORT = 18111, 18112
PROMPT = {"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0, "stream": True}


def first_token_s(base: str, model: str, timeout_s: float = 600) -> float:
    """Seconds from sending a streaming completion to its first text chunk."""
    start = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/completions", json={"model": model, **PROMPT},
                      timeout=timeout_s) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                return time.perf_counter() - start
    raise RuntimeError(f"{model}: no token")


def direct_cold_start(model_path: str, log: Path) -> float:
    """Launch vLLM's server and time launch -> first token (readiness polled every 0.1 s)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--served-model-name", "code", "--host", "127.0.0.1", "--port", str(DIRECT_PORT),
           "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048",
           "--disable-log-stats"]
    env = {**os.environ, **ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "1"}
    base = f"http://127.0.0.1:{DIRECT_PORT}"
    start = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - start > 600:
                raise TimeoutError("vLLM not ready after 600 s")
            time.sleep(0.1)  # readiness polling interval
        first_token_s(base, "code")
        return time.perf_counter() - start
    finally:
        _stop(proc)


def _decision_times(status: dict[str, Any], since: float) -> dict[str, float]:
    """Wall time of the first decision of each kind after `since`."""
    found: dict[str, float] = {}
    for d in status["decisions"]:
        if d["time"] < since:
            continue
        kind = " ".join(d["message"].split(":")[0].split()[:2])  # "evict code", "ready x"
        found.setdefault(kind, d["time"])
    return found


def roundhouse_runs(runs: int) -> dict[str, Any]:
    import ray
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import MEMORY_RESOURCE, load_app_config, memory_mib, serve_config
    from serve_app.controller import lookup

    config = load_app_config(REPO / "configs" / "local.yaml")
    ray.init(address="local", include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, resources={MEMORY_RESOURCE: memory_mib(config.budget_gib)})
    base = f"http://127.0.0.1:{ROUNDHOUSE_PORT}"
    try:
        client = serve_start(http_options={"host": "127.0.0.1", "port": ROUNDHOUSE_PORT})
        client.deploy_apps(ServeDeploySchema.model_validate(
            serve_config(config.model_dump(), ROUNDHOUSE_PORT)))
        deadline = time.monotonic() + 600
        while True:  # the pinned chat model loads at deploy
            try:
                first_token_s(base, "chat", timeout_s=30)
                break
            except (httpx.HTTPError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)  # readiness polling interval
        controller = lookup("roundhouse")
        cold = [first_token_s(base, "code")]
        swaps: list[dict[str, float]] = []
        for model in (["reasoning", "code"] * runs)[:max(2, runs)]:
            since = time.time()
            ttft = first_token_s(base, model)
            t = _decision_times(ray.get(controller.status.remote()), since)
            evicted = next(k for k in t if k.startswith("evict "))
            victim = evicted.split()[1]
            swaps.append({
                "model": model,  # type: ignore[dict-item]
                "first_token_s": ttft,
                "decision_to_serving_s": t[f"ready {model}"] - t[evicted],
                "drain_and_stop_s": t[f"stopped {victim}"] - t[evicted],
                "load_s": t[f"ready {model}"] - t[f"load {model}"],
            })
        return {"cold_first_token_s": cold, "swaps": swaps}
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="baseline starts and swaps")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from serve_app.local_models import resolve_model_path

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "raw").mkdir(exist_ok=True)
    log = RESULTS / "raw" / "cold_start_vllm.log"
    log.unlink(missing_ok=True)
    model_path = resolve_model_path("smollm2-135m-instruct")
    direct = [direct_cold_start(model_path, log) for _ in range(args.runs)]
    rh = roundhouse_runs(args.runs)
    direct_med = statistics.median(direct)
    cold_med = statistics.median(rh["cold_first_token_s"])
    report = {
        "benchmark": "cold_start",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": "SmolLM2-135M-Instruct, float32, enforce_eager, max_model_len 2048, 1 GiB KV",
        "baseline_vllm_launch_to_first_token_s": direct,
        "roundhouse_cold_first_token_s": rh["cold_first_token_s"],
        "cold_start_ratio": cold_med / direct_med,
        "target_cold_start_ratio": 1.2,
        "swaps": rh["swaps"],
    }
    (RESULTS / "cold_start.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"baseline: vLLM server launch -> first token  {direct_med:6.1f} s (median of "
          f"{len(direct)})")
    print(f"roundhouse: cold model request -> first token {cold_med:6.1f} s  "
          f"ratio {report['cold_start_ratio']:.2f}x (target <= 1.2x)")
    for s in rh["swaps"]:
        print(f"swap to {s['model']:<10} first token {s['first_token_s']:6.1f} s; eviction "
              f"decision -> serving {s['decision_to_serving_s']:5.1f} s (drain+stop+free "
              f"{s['drain_and_stop_s']:4.1f} s, load {s['load_s']:5.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
