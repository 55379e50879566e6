"""What a model's `stream_batch_ms` (serve_app/config.py) costs and saves on a streamed response.

The evidence for its default. After a streamed response's first bytes, the model replica waits
`stream_batch_ms` and sends what the engine produced meanwhile as one item across Ray to the
ingress (deployments/model_server.py, `ModelServer.stream`): fewer items cost less CPU in the
replica, the ingress and the HTTP front, but tokens reach the client in bursts. This measures
both sides with the tests' fake engine (tests/fake_engine.py) generating like a GPU
(`--tokens-per-s` per stream, default 100, no prefill time), so that the request path is the only
thing that costs CPU.

One Ray cluster of its own (GCS port 16390, temp dir /tmp/rh-streambatch, Serve's HTTP front on
port 18106; its HAProxy stats/metrics and Serve's fallback proxy on ports of their own too),
started with SERVE_TRANSPORT_ENV as `make serve` starts Ray (HAProxy front, direct ingress, gRPC
between deployments), serves one app with one pinned fake model per value of `--values`, alike
but for stream_batch_ms: `b0`, `b5`, `b10`, ... Each round runs, for each model (in an order
shuffled per round, seeded), one workload: `--requests` streaming /v1/chat/completions requests
(`max_tokens` tokens each, four prompts in turn), `--concurrency` at a time, from an httpx client
in this process. Measured at the client and on the cluster:
  TTFT        send to the first `data:` event, p50/p99 over the workload's requests
  ITL         gaps between consecutive content tokens' arrival (a chunk of k tokens arriving at
              once gives k-1 gaps of 0), p50/p99 over all the workload's gaps
  tok/s       content tokens received / the workload's wall time
  chunks/req  HTTP body chunks per response (about the items that crossed Ray)
  CPU ms/1k   CPU time (user + system) of the cluster's processes during the workload (every
              process in the session of `ray start` or under it, or with the temp dir in its
              command line: GCS, raylet, Serve's actors, the replicas, HAProxy) per 1000 content
              tokens; "above idle": less what the idle cluster uses in that time (measured for
              IDLE_S before the rounds: GCS, raylet, Serve's controller, idle replicas); the
              JSON has it by process too (ingress, the measured model's replica, haproxy, rest)
Each model's median over rounds is reported with the spread (min..max), and the ratio to the
first value's model (b0) within each round, median and spread. Writes
benchmarks/results/stream_batch.json (--output to change) and prints a markdown table; Ray's
and the deploy's logs stay under the temp dir. Stops every process it started (by process group)
on exit, Ctrl-C or failure; other Ray clusters on the machine are left alone.

    python benchmarks/stream_batch.py [--values 0,5,10,20,50] [--rounds 3] [--concurrency 16]
        [--requests 64] [--max-tokens 128] [--tokens-per-s 100] [--quick]

--quick (a smoke test): 1 round, concurrency 4, 8 requests, max_tokens 32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from overhead import _DEPLOY, Processes, _port_free, _raise_on_sigterm  # noqa: E402
from path_latency import _percentile, _wait_serving  # noqa: E402

from serve_app.config import MEMORY_RESOURCE, deployment_name, memory_mib  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
APP_NAME = "roundhouse"
TEMP_DIR = "/tmp/rh-streambatch"
RAY_PORT = 16390
SERVE_PORT = 18106
# Every other port of this cluster, away from a default cluster's, the tests' and the other
# benchmarks' (overhead.py: 16380-16599, 18101-18105).
RAY_PORTS = {"--node-manager-port": 16391, "--object-manager-port": 16392,
             "--ray-client-server-port": 16393, "--dashboard-agent-listen-port": 16394,
             "--dashboard-agent-grpc-port": 16395, "--runtime-env-agent-port": 16396,
             "--metrics-export-port": 16397, "--min-worker-port": 16600,
             "--max-worker-port": 16799}
# Serve's HAProxy mode's own fixed ports, moved (serve_app.app.transport_ports_env).
SERVE_PORTS_BASE, SERVE_INGRESS_PORTS_FROM = 20460, 23000
MEMORY_GIB = 0.5  # each fake model's share of the residency budget (all fit, all pinned)
PROMPTS = ("hi", "Write a haiku about trains.",
           "Summarise the plot of a long novel about a railway roundhouse in a few sentences.",
           "Explain, step by step, how a turntable moves a locomotive from one track to another "
           "and why yards were built around them.")
READY_TIMEOUT_S = 600
METRICS = ("tok_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
           "cpu_ms_per_1k_tokens", "cpu_ms_per_1k_tokens_above_idle", "chunks_per_request")
IDLE_S = 5  # how long the idle cluster's own CPU use is measured
_REPLICA = re.compile(r"ServeReplica:[^:\s]+:([^\s.]+)")


def model_name(value: float) -> str:
    return f"b{value:g}"


# --- the cluster ----------------------------------------------------------------------------

def start_cluster(procs: Processes, values: list[float], tokens_per_s: float
                  ) -> tuple[int, Path]:
    """Starts the Ray cluster and deploys the app; returns the pid of `ray start` and the
    temp dir (logs)."""
    from serve_app.app import SERVE_TRANSPORT_ENV, transport_ports_env

    serve_ports = transport_ports_env(SERVE_PORTS_BASE, SERVE_INGRESS_PORTS_FROM)
    ports = [RAY_PORT, SERVE_PORT, *RAY_PORTS.values()]
    ports += [int(v) for k, v in serve_ports.items() if "INGRESS" not in k]
    taken = [p for p in ports if not _port_free(p)]
    if taken:
        raise RuntimeError(f"ports {taken} are taken (another run of this benchmark?)")
    temp = Path(TEMP_DIR)
    temp.mkdir(parents=True, exist_ok=True)
    budget = MEMORY_GIB * len(values)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            **SERVE_TRANSPORT_ENV, **serve_ports}
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "start", "--head", "--block", "--port", str(RAY_PORT), "--temp-dir", TEMP_DIR,
           "--num-cpus", "4", "--include-dashboard", "false", "--disable-usage-stats",
           "--object-store-memory", str(256 << 20),
           "--resources", json.dumps({MEMORY_RESOURCE: memory_mib(budget)})]
    for flag, port in RAY_PORTS.items():
        cmd += [flag, str(port)]
    ray_proc = procs.start("ray", cmd, env, temp / "ray-start.log")
    document = serve_document(values, budget, tokens_per_s)
    path = temp / "serve-config.json"
    path.write_text(json.dumps(document, indent=2))
    with (temp / "deploy.log").open("ab") as out:
        subprocess.run([sys.executable, "-c", _DEPLOY, f"127.0.0.1:{RAY_PORT}", str(path)],
                       env={k: v for k, v in env.items() if k not in SERVE_TRANSPORT_ENV},
                       stdout=out, stderr=subprocess.STDOUT, check=True, timeout=600)
    return ray_proc.pid, temp


def serve_document(values: list[float], budget_gib: float, tokens_per_s: float
                   ) -> dict[str, Any]:
    from serve_app.app import serve_config

    models = [{"name": model_name(v), "model": "fake", "pinned": True, "num_gpus": 0,
               "memory_gib": MEMORY_GIB, "stream_batch_ms": v,
               "engine_kwargs": {"tokens_per_s": tokens_per_s, "ttft_s": 0}} for v in values]
    document = serve_config({"models": models, "residency": {"gpu_memory_gib": budget_gib}},
                            SERVE_PORT, app_name=APP_NAME,
                            import_path="tests.fake_engine:build_app")
    # The replicas import the fake engine from the repository's tests package.
    document["applications"][0]["runtime_env"] = {"env_vars": {"PYTHONPATH": str(REPO)}}
    return document


def cluster_cpu(ray_pid: int) -> dict[tuple[int, float], tuple[float, str]]:
    """CPU seconds so far and the Serve deployment (or process name) of each live process of the
    cluster: in the session of `ray start`, under it, or with the temp dir in its command line."""
    found: dict[tuple[int, float], tuple[float, str]] = {}
    try:
        session = os.getsid(ray_pid)
        under = {p.pid for p in psutil.Process(ray_pid).children(recursive=True)}
    except (OSError, psutil.Error):
        return found
    for proc in psutil.process_iter(["pid", "name", "cmdline", "create_time", "cpu_times"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
            ours = (proc.pid == ray_pid or proc.pid in under or TEMP_DIR in line
                    or os.getsid(proc.pid) == session)
            times = proc.info["cpu_times"]
        except (OSError, psutil.Error):
            continue
        if not ours or times is None:
            continue
        replica = _REPLICA.search(line)
        role = replica.group(1) if replica else ("haproxy" if "haproxy" in line
                                                 else proc.info["name"] or "?")
        found[(proc.pid, proc.info["create_time"])] = (times.user + times.system, role)
    return found


def cpu_used(before: dict[tuple[int, float], tuple[float, str]],
             after: dict[tuple[int, float], tuple[float, str]], model: str) -> dict[str, float]:
    """CPU seconds used between two snapshots by the ingress, `model`'s replica, HAProxy and
    the rest (processes that ended in between are not counted)."""
    used = {"total": 0.0, "ingress": 0.0, "model_replica": 0.0, "haproxy": 0.0, "rest": 0.0}
    for key, (cpu, role) in after.items():
        delta = cpu - before.get(key, (0.0, role))[0]
        group = {"ingress": "ingress", deployment_name(model): "model_replica",
                 "haproxy": "haproxy"}.get(role, "rest")
        used[group] += delta
        used["total"] += delta
    return used


# --- the workload ---------------------------------------------------------------------------

async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]
                      ) -> dict[str, Any]:
    """One streamed request: TTFT, each content token's arrival time, body chunks received."""
    start = time.perf_counter()
    first: float | None = None
    arrivals: list[float] = []
    chunks, done, error = 0, False, None
    buffer = b""
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                return {"error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"}
            async for piece in resp.aiter_raw():
                now = time.perf_counter()
                chunks += 1
                buffer += piece
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if not event.startswith(b"data: "):
                        continue
                    if first is None:
                        first = now - start
                    data = event[6:]
                    if data == b"[DONE]":
                        done = True
                        continue
                    parsed = json.loads(data)
                    if "error" in parsed:
                        error = str(parsed["error"])[:200]
                    for choice in parsed.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            arrivals.append(now)
    except httpx.HTTPError as exc:
        return {"error": repr(exc)[:200]}
    if error or not done:
        return {"error": error or "no [DONE]"}
    return {"ttft_s": first, "arrivals": arrivals, "chunks": chunks}


async def workload(client: httpx.AsyncClient, model: str, requests: int, concurrency: int,
                   max_tokens: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{SERVE_PORT}/v1/chat/completions"
    pending = list(range(requests))
    results: list[dict[str, Any]] = []

    async def worker() -> None:
        while pending:
            i = pending.pop()
            body = {"model": model, "stream": True, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            results.append(await one_request(client, url, body))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall_s = time.perf_counter() - start
    good = [r for r in results if "error" not in r]
    errors = sorted({r["error"] for r in results if "error" in r})
    tokens = sum(len(r["arrivals"]) for r in good)
    ttft = [r["ttft_s"] * 1000 for r in good]
    gaps = [(b - a) * 1000 for r in good for a, b in zip(r["arrivals"], r["arrivals"][1:],
                                                         strict=False)]
    return {"requests": len(results), "failed": len(results) - len(good), "errors": errors[:3],
            "tokens": tokens, "wall_s": wall_s, "tok_s": tokens / wall_s,
            "ttft_ms_p50": statistics.median(ttft) if ttft else None,
            "ttft_ms_p99": _percentile(ttft, 0.99) if ttft else None,
            "itl_ms_p50": statistics.median(gaps) if gaps else None,
            "itl_ms_p90": _percentile(gaps, 0.90) if gaps else None,
            "itl_ms_p99": _percentile(gaps, 0.99) if gaps else None,
            "itl_ms_mean": statistics.fmean(gaps) if gaps else None,
            "chunks_per_request": (statistics.fmean(r["chunks"] for r in good)
                                   if good else None)}


async def run_rounds(args: argparse.Namespace, models: list[str], ray_pid: int,
                     idle_cpu_per_s: float) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)
    rounds: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for model in models:  # opens the connections, wakes every path up
            await workload(client, model, args.concurrency, args.concurrency, 8)
        for r in range(1, args.rounds + 1):
            order = list(models)
            random.Random(r).shuffle(order)
            round_: dict[str, Any] = {"round": r, "order": order, "results": {}}
            for model in order:
                await asyncio.sleep(0.5)  # the previous workload's stragglers settle
                before = cluster_cpu(ray_pid)
                m = await workload(client, model, args.requests, args.concurrency,
                                   args.max_tokens)
                cpu = cpu_used(before, cluster_cpu(ray_pid), model)
                m["cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}
                m["cpu_ms_per_1k_tokens"] = (cpu["total"] * 1e6 / m["tokens"]
                                             if m["tokens"] else None)
                above = max(0.0, cpu["total"] - idle_cpu_per_s * m["wall_s"])
                m["cpu_ms_per_1k_tokens_above_idle"] = (above * 1e6 / m["tokens"]
                                                        if m["tokens"] else None)
                m["cpu_ms_per_1k_tokens_by_process"] = {
                    k: round(v * 1e6 / m["tokens"], 1) if m["tokens"] else None
                    for k, v in cpu.items() if k != "total"}
                m["load"] = os.getloadavg()[0]
                round_["results"][model] = m
                print(f"round {r} {model:<6} {m['tok_s']:7.0f} tok/s  TTFT p50 "
                      f"{_num(m['ttft_ms_p50'])} ms  ITL p50/p99 {_num(m['itl_ms_p50'])}/"
                      f"{_num(m['itl_ms_p99'])} ms  CPU {_num(m['cpu_ms_per_1k_tokens'], 0)} "
                      f"({_num(m['cpu_ms_per_1k_tokens_above_idle'], 0)} above idle) ms/1k tok  "
                      f"{_num(m['chunks_per_request'])} chunks/req"
                      f"  load {m['load']:.1f}"
                      f"{'  FAILED ' + str(m['failed']) if m['failed'] else ''}", flush=True)
            rounds.append(round_)
    return rounds


# --- the report -----------------------------------------------------------------------------

def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _spread(values: list[float | None]) -> dict[str, float] | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return {"median": statistics.median(known), "min": min(known), "max": max(known)}


def summarize(rounds: list[dict[str, Any]], models: list[str]) -> dict[str, Any]:
    base = models[0]
    summary: dict[str, Any] = {}
    for model in models:
        runs = [r["results"][model] for r in rounds]
        entry: dict[str, Any] = {k: _spread([m[k] for m in runs]) for k in METRICS}
        entry["failed"] = sum(m["failed"] for m in runs)
        ratios: dict[str, Any] = {}
        for k in METRICS:
            per_round = [m[k] / r["results"][base][k] for m, r in zip(runs, rounds, strict=True)
                         if m[k] is not None and r["results"][base][k]]
            ratios[k] = _spread(list(per_round))
        entry[f"vs_{base}"] = ratios
        summary[model] = entry
    return summary


def markdown(summary: dict[str, Any], models: list[str], values: list[float]) -> str:
    def cell(spread: dict[str, float] | None, digits: int = 1) -> str:
        if spread is None:
            return "-"
        return (f"{spread['median']:.{digits}f} ({spread['min']:.{digits}f}.."
                f"{spread['max']:.{digits}f})")

    base = models[0]
    lines = [f"| stream_batch_ms | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
             f"| CPU ms / 1k tok | above idle | chunks / req | tok/s vs {base} "
             f"| CPU above idle vs {base} |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, value in zip(models, values, strict=True):
        s = summary[model]
        ratios = s[f"vs_{base}"]
        lines.append(f"| {value:g} | {cell(s['tok_s'], 0)} | {cell(s['ttft_ms_p50'])} | "
                     f"{cell(s['ttft_ms_p99'])} | {cell(s['itl_ms_p50'])} | "
                     f"{cell(s['itl_ms_p99'])} | {cell(s['cpu_ms_per_1k_tokens'], 0)} | "
                     f"{cell(s['cpu_ms_per_1k_tokens_above_idle'], 0)} | "
                     f"{cell(s['chunks_per_request'])} | {cell(ratios['tok_s'], 2)} | "
                     f"{cell(ratios['cpu_ms_per_1k_tokens_above_idle'], 2)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", default="0,5,10,20,50",
                        help="stream_batch_ms values, one model each; ratios are to the first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per workload")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--tokens-per-s", type=float, default=100.0,
                        help="the fake engine's decode speed per stream")
    parser.add_argument("--output", type=Path, default=RESULTS / "stream_batch.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 round, concurrency 4, 8 requests, max_tokens 32")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.concurrency, args.requests, args.max_tokens = 1, 4, 8, 32
    values = [float(v) for v in args.values.split(",") if v.strip()]
    if not values or len(set(values)) != len(values):
        parser.error("--values: distinct numbers, comma-separated")
    models = [model_name(v) for v in values]
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    procs = Processes()
    started = time.monotonic()
    try:
        print(f"starting the cluster ({TEMP_DIR}) and models {', '.join(models)}", flush=True)
        ray_pid, temp = start_cluster(procs, values, args.tokens_per_s)
        for model in models:
            _wait_serving(f"http://127.0.0.1:{SERVE_PORT}/v1/chat/completions",
                          {"model": model, "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 1}, timeout_s=READY_TIMEOUT_S)
        print(f"ready after {time.monotonic() - started:.0f} s", flush=True)
        idle_before, idle_start = cluster_cpu(ray_pid), time.monotonic()
        time.sleep(IDLE_S)  # the idle cluster's own CPU use
        idle = cpu_used(idle_before, cluster_cpu(ray_pid), "")["total"]
        idle_cpu_per_s = idle / (time.monotonic() - idle_start)
        rounds = asyncio.run(run_rounds(args, models, ray_pid, idle_cpu_per_s))
    finally:
        procs.stop_all()
    summary = summarize(rounds, models)
    report = {"benchmark": "stream_batch",
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": {"values": values, "rounds": args.rounds,
                           "concurrency": args.concurrency, "requests": args.requests,
                           "max_tokens": args.max_tokens, "tokens_per_s": args.tokens_per_s,
                           "quick": args.quick, "cpus": os.cpu_count(),
                           "transport": "SERVE_TRANSPORT_ENV (HAProxy, direct ingress)"},
              "idle_cluster_cpu_ms_per_s": round(idle_cpu_per_s * 1000, 1),
              "wall_s": round(time.monotonic() - started, 1),
              "summary": summary, "per_round": rounds}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nidle cluster: {idle_cpu_per_s * 1000:.0f} ms CPU per s; logs under {temp}; "
          f"wrote {args.output}\n")
    print(markdown(summary, models, values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
