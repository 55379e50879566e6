"""Where the request path spends its time: py-spy on Serve's proxy, the ingress and the model
replica while a client sends requests through them (fake engine: no generation cost), then the
top frames of each process, by the share of samples they are on the stack (cumulative) and at the
top of it (self).

    python benchmarks/profile_path.py [--seconds 20] [--stream] [--out benchmarks/results/profile.json]

Needs py-spy (`pip install py-spy`) and permission to trace the processes (root, or
kernel.yama.ptrace_scope 0). Writes the collapsed stacks beside the summary (for flame graphs:
`flamegraph.pl` or speedscope) and prints the tables that README's Benchmarks section shows.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PORT = 18104
# Frames of the interpreter's idle waiting (the event loop's select, thread locks): not work.
IDLE = ("select (selectors.py", "_run_once (asyncio", "wait (threading.py",
        "_worker (concurrent", "run (threading.py", "main_loop", "_wait_for_tstate_lock",
        "poll (selectors.py", "epoll", "sleep (")


def _processes() -> dict[str, int]:
    """pid of Serve's proxy (none with HAProxy), the ingress replica and the model replica."""
    import psutil

    found: dict[str, int] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if "ray::ProxyActor" in line:
            found["proxy"] = proc.info["pid"]
        elif "ray::ServeReplica:roundhouse:ingress" in line:
            found["ingress"] = proc.info["pid"]
        elif "ray::ServeReplica:roundhouse:model-chat" in line:
            found["model replica"] = proc.info["pid"]
    return found


def _load(url: str, body: dict[str, Any], stream: bool, stop: threading.Event) -> int:
    count = 0
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            if stream:
                with client.stream("POST", url, json={**body, "stream": True}) as resp:
                    for _ in resp.iter_raw():
                        pass
            else:
                client.post(url, json=body).raise_for_status()
            count += 1
    return count


def _summary(collapsed: Path, top: int = 12) -> dict[str, Any]:
    """Top frames by cumulative and self share of the samples that are not idle waiting."""
    cumulative: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        if any(mark in frames[-1] for mark in IDLE):
            idle += count
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            cumulative[frame] += count
    busy = max(1, total - idle)
    return {"samples": total, "busy_share": round(busy / max(1, total), 3),
            "top_cumulative": [(f, round(n / busy, 3)) for f, n in cumulative.most_common(top)],
            "top_self": [(f, round(n / busy, 3)) for f, n in own.most_common(top)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--stream", action="store_true", help="streaming requests")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens per request")
    parser.add_argument("--label", default="after")
    parser.add_argument("--transport", choices=("haproxy", "default"), default="haproxy",
                        help="Serve's transport: what `make serve` starts Ray with "
                        "(`roundhouse ray-env`: HAProxy, no Python proxy), or Serve's defaults")
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path.insert(0, str(REPO))
    if args.transport == "haproxy":
        from serve_app.app import SERVE_TRANSPORT_ENV, transport_ports_env

        os.environ.update(SERVE_TRANSPORT_ENV | transport_ports_env(20450, 22600))
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import serve_config

    ray.init(address="local", include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        document = serve_config(
            {"models": [{"name": "chat", "model": "fake", "pinned": True,
                         "engine_kwargs": {"tokens_per_s": 2000}}]}, PORT,
            import_path="tests.fake_engine:build_app")
        serve_start(http_options={"host": "127.0.0.1", "port": PORT}).deploy_apps(
            ServeDeploySchema.model_validate(document))
        url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": args.tokens}
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.post(url, json=body, timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the app did not start")
            time.sleep(0.5)  # readiness polling interval
        stop = threading.Event()
        counts: list[int] = []
        worker = threading.Thread(target=lambda: counts.append(
            _load(url, body, args.stream, stop)))
        worker.start()
        time.sleep(2)  # let the load settle before sampling  # noqa: ASYNC251
        out_dir = RESULTS / "raw"
        out_dir.mkdir(parents=True, exist_ok=True)
        spies = {}
        for name, pid in _processes().items():
            path = out_dir / f"profile-{args.label}-{name.replace(' ', '_')}.txt"
            spies[name] = (path, subprocess.Popen(
                [pyspy, "record", "--pid", str(pid), "--duration", str(args.seconds),
                 "--rate", "200", "--format", "raw", "--output", str(path), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _, proc in spies.values():
            proc.wait()
        stop.set()
        worker.join()
        report = {"label": args.label, "transport": args.transport, "stream": args.stream, "max_tokens": args.tokens,
                  "seconds": args.seconds, "requests": counts[0] if counts else 0,
                  "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "processes": {name: _summary(path) for name, (path, _) in spies.items()}}
    finally:
        serve.shutdown()
        ray.shutdown()
    result = RESULTS / f"profile_path-{args.label}.json"
    result.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['requests']} requests in {args.seconds} s "
          f"({'stream' if args.stream else 'whole'}, max_tokens {args.tokens})")
    for name, summary in report["processes"].items():
        print(f"\n{name}: busy {summary['busy_share']:.0%} of {summary['samples']} samples")
        for frame, share in summary["top_cumulative"]:
            print(f"  {share:6.1%}  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
