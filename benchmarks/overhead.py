"""What Roundhouse costs on top of vLLM, and against Ray Serve LLM, in interleaved rounds.

Four targets serve the same model; all are started once and measured in rounds (A B C D, A B C
D, ...), so that the machine's drift (the baseline moves by 20% and more between runs on this
2-core machine) hits every target alike and a ratio taken within a round can show a few percent.

Targets, all serving SmolLM2-135M-Instruct (`roundhouse prepare-models`) with the same engine
settings (ENGINE_KWARGS, ENGINE_ENV: float32, eager, max_model_len 2048, 1 GiB KV, the engine's
OpenMP thread bound to core 0):
  A vllm        vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`)
  B roundhouse  Roundhouse: the model pinned, no auth, requests name it
  C gateway     Roundhouse with the gateway on: an API key whose rate limits are never reached,
                routing rules, `"model": "auto"`
  D rayllm      Ray Serve LLM (`ray.serve.llm.build_openai_app`, one LLMConfig with
                `accelerator_config: {kind: cpu}`), the peer a user would pick instead
B, C and D are three applications of one Serve instance (route prefixes /roundhouse, /gateway,
/rayllm) on a Ray cluster of this benchmark's own (GCS port 16380, temp dir /tmp/rh-overhead).
All four stay up for the whole run; only the target being measured gets requests.

Each round runs, for each target in the order A B C D, three workloads with vLLM's serving
benchmark (`vllm.benchmarks.serve`; random dataset, 128 input / 64 output tokens, ignore_eos; one
seed per round and workload, the same for every target; one short warm-up request of a different
prompt before each, so no measured prompt is in the prefix cache):
  completions_c16  /v1/completions, concurrency 16 (--prompts-c16, 64): output throughput
  completions_c1   /v1/completions, concurrency 1 (--prompts-c1, 8): median TTFT
  chat_c1          /v1/chat/completions with stream: true, concurrency 1 (--prompts-c1): median
                   TTFT, inter-token latency p50 (median_itl_ms)
For each metric and pair of targets (B/A, C/A, D/A, B/D and the gateway's C/B) it reports the
median of the per-round ratios (differences in ms for TTFT) and their spread (min..max over
rounds), beside the per-round values and issue 17's targets.

--pin-ray CPUS starts the Ray cluster, the benchmark client and target A's server under
`taskset -c CPUS` (default none: nothing pinned), so every process but the engines' OpenMP
threads (vLLM binds those to VLLM_CPU_OMP_THREADS_BIND's core itself) stays off the engines' core.

    python benchmarks/overhead.py [--rounds 3] [--pin-ray 1] [--quick]

Writes benchmarks/results/overhead.json, the bench's per-run files under benchmarks/results/raw/
(overhead-r<round>-<target>-<workload>.json), logs to benchmarks/results/overhead-*.log, and
prints markdown tables. Stops every process it started (by process group) on exit, Ctrl-C or
failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
RAW = RESULTS / "raw"
MODEL_NAME = "chat"
MODEL_SOURCE = "smollm2-135m-instruct"
ENGINE_KWARGS: dict[str, Any] = {"enforce_eager": True, "dtype": "float32",
                                 "max_model_len": 2048}
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
ENGINE_CORE = "0"  # VLLM_CPU_OMP_THREADS_BIND: the engines' OpenMP thread runs here
DIRECT_PORT, ROUNDHOUSE_PORT = 18101, 18102  # ROUNDHOUSE_PORT: roundhouse() (spike.py)
SERVE_PORT = 18105
RAY_PORT = 16380
RAY_TEMP_DIR = "/tmp/rh-overhead"
# Every port of this benchmark's Ray cluster, away from a default cluster's.
RAY_PORTS = {"--node-manager-port": 16381, "--object-manager-port": 16382,
             "--ray-client-server-port": 16383, "--dashboard-agent-listen-port": 16384,
             "--dashboard-agent-grpc-port": 16385, "--runtime-env-agent-port": 16386,
             "--metrics-export-port": 16387, "--min-worker-port": 16400,
             "--max-worker-port": 16599}
# Logical CPUs Ray offers: Ray Serve LLM asks for 3 (ingress 1, server replica and engine
# bundle 2); Roundhouse's deployments ask for none.
RAY_NUM_CPUS = 4
# The gateway target: an API key with limits it never reaches, routing rules, `"model": "auto"`.
GATEWAY_KEY = "rh-overhead-benchmark-key"
INPUT_LEN, OUTPUT_LEN = 128, 64
PIN_DEFAULT: str | None = None
RAYLLM_PYTHONPATH = str(Path.home() / ".cache" / "roundhouse" / "overhead-pylib")
READY_TIMEOUT_S = 1200
METRICS = ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
           "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "completed",
           "failed", "duration")


@dataclass(frozen=True)
class Target:
    key: str
    letter: str
    label: str
    prefix: str  # the URL path prefix of its OpenAI API on its port
    model: str  # the "model" its requests name
    api_key: str | None = None


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    backend: str
    endpoint: str
    concurrency: int


TARGETS = (
    Target("vllm", "A", "vLLM server", "", MODEL_NAME),
    Target("roundhouse", "B", "Roundhouse", "/roundhouse", MODEL_NAME),
    Target("gateway", "C", "Roundhouse, gateway on", "/gateway", "auto", GATEWAY_KEY),
    Target("rayllm", "D", "Ray Serve LLM", "/rayllm", MODEL_NAME),
)
WORKLOADS = (
    Workload("completions_c16", "/v1/completions, concurrency 16", "openai", "/v1/completions",
             16),
    Workload("completions_c1", "/v1/completions, concurrency 1", "openai", "/v1/completions", 1),
    Workload("chat_c1", "streaming chat, concurrency 1", "openai-chat", "/v1/chat/completions",
             1),
)
# (metric, workload, how two targets compare: "ratio" x/y or "delta" x - y in ms)
COMPARISONS = (
    ("output_throughput", "completions_c16", "ratio"),
    ("median_ttft_ms", "completions_c1", "delta"),
    ("median_itl_ms", "chat_c1", "ratio"),
    ("median_ttft_ms", "chat_c1", "delta"),
    ("median_tpot_ms", "completions_c1", "ratio"),
)
METRIC_LABELS = {"output_throughput": "output tok/s", "median_ttft_ms": "TTFT p50",
                 "median_itl_ms": "ITL p50", "median_tpot_ms": "TPOT p50"}
PAIRS = (("roundhouse", "vllm"), ("gateway", "vllm"), ("rayllm", "vllm"),
         ("roundhouse", "rayllm"), ("gateway", "roundhouse"))
# Issue 17's targets, on the median of the rounds: (metric, workload, pair, op, bound, text).
GOALS = (
    ("output_throughput", "completions_c16", ("roundhouse", "vllm"), ">=", 0.97,
     "throughput at concurrency 16, Roundhouse / vLLM >= 0.97"),
    ("output_throughput", "completions_c16", ("roundhouse", "rayllm"), ">=", 1.0,
     "throughput at concurrency 16, Roundhouse / Ray Serve LLM >= 1"),
    ("median_ttft_ms", "completions_c1", ("roundhouse", "vllm"), "<=", 15.0,
     "median TTFT at concurrency 1, Roundhouse - vLLM <= +15 ms"),
    ("median_ttft_ms", "completions_c1", ("roundhouse", "rayllm"), "<=", 0.0,
     "median TTFT at concurrency 1, Roundhouse - Ray Serve LLM <= 0 ms"),
    ("median_itl_ms", "chat_c1", ("roundhouse", "vllm"), "<=", 1.03,
     "chat streaming ITL p50 at concurrency 1, Roundhouse / vLLM <= 1.03"),
)

# The benchmark client: one process for the whole run (importing vLLM's bench takes ~10 s of
# CPU), which runs `vllm.benchmarks.serve` once per JSON argument list read from stdin and
# answers "ok" or "error ..." on stdout; the bench's own output goes to stderr (the log).
_BENCH_CLIENT = r"""
import json, sys, traceback
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
answer, sys.stdout = sys.stdout, sys.stderr
answer.write("ready\n"); answer.flush()
for line in sys.stdin:
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    try:
        main(parser.parse_args(json.loads(line)))
        answer.write("ok\n")
    except BaseException as exc:
        traceback.print_exc()
        answer.write("error " + json.dumps(repr(exc)) + "\n")
    answer.flush()
"""

# Deploys a Serve config document on the running cluster and exits (Serve's controller is
# detached: the applications stay).
_DEPLOY = r"""
import json, sys, time
import ray
from ray.serve._private.api import serve_start
from ray.serve.schema import ServeDeploySchema
doc = json.load(open(sys.argv[2]))
for attempt in range(30):
    try:
        ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
        break
    except Exception:
        if attempt == 29:
            raise
        time.sleep(2)
serve_start(http_options=doc["http_options"]).deploy_apps(
    ServeDeploySchema.model_validate(doc))
"""


# --- processes ------------------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, process group, session) of a live process, None if it is gone (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[2]), int(fields[3])


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[2] == sid:
                pids.append(int(entry.name))
    return pids


class Processes:
    """Every process this run starts leads a session (and process group) of its own, so what it
    starts in turn (Ray's daemons and workers, the engines' processes) can be found and stopped
    by group, never by name."""

    def __init__(self) -> None:
        self._started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str], log: Path,
              pipes: bool = False) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, env=env, stderr=out, start_new_session=True,
                stdout=subprocess.PIPE if pipes else out,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL, bufsize=0)
        self._started.append((name, proc))
        return proc

    def sessions(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._started}

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by the live processes of each session, and by the whole
        machine ("machine": every CPU's busy time, from /proc/stat)."""
        used = {name: sum(_cpu_s(pid) for pid in _session_pids(proc.pid))
                for name, proc in self._started}
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        return used | {"machine": busy / os.sysconf("SC_CLK_TCK")}

    def stop(self, proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
        sid = proc.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            groups = {stat[1] for pid in _session_pids(sid)
                      if (stat := _proc_stat(pid)) is not None}
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, sig)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                proc.poll()
                if not _session_pids(sid):
                    return
                time.sleep(0.5)  # while the processes exit
        proc.poll()

    def stop_all(self) -> None:
        while self._started:
            name, proc = self._started.pop()
            self.stop(proc)


def _taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _wait_port_free(port: int, timeout_s: float = 120) -> None:
    """The previous server (its Ray proxy outlives `serve run` by a few seconds) must be gone,
    or the next run's readiness checks would be answered by it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _port_free(port):
            return
        time.sleep(0.5)  # polling interval while the old server exits
    raise RuntimeError(f"port {port} is still taken after {timeout_s:.0f} s")


def _post(url: str, body: dict[str, Any], api_key: str | None = None,
          timeout_s: float = 600) -> bytes:
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        data: bytes = resp.read()
        return data


# --- the targets ----------------------------------------------------------------------------

def start_vllm_server(procs: Processes, model_path: str, pin: str | None, log: Path) -> Any:
    if not _port_free(DIRECT_PORT):
        raise RuntimeError(f"port {DIRECT_PORT} is taken")
    cmd = [*_taskset(pin), sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", model_path, "--served-model-name", MODEL_NAME, "--host", "127.0.0.1",
           "--port", str(DIRECT_PORT), "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "2048", "--disable-log-stats"]
    return procs.start("vllm-server", cmd, {**os.environ, **ENGINE_ENV}, log)


def _ray_env(transport: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"} | transport


def start_ray(procs: Processes, pin: str | None, log: Path,
              transport: dict[str, str]) -> Any:
    taken = [p for p in (RAY_PORT, SERVE_PORT, *RAY_PORTS.values()) if not _port_free(p)]
    if taken:
        raise RuntimeError(f"ports {taken} are taken (another run of this benchmark?)")
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [*_taskset(pin), ray, "start", "--head", "--block", "--port", str(RAY_PORT),
           "--temp-dir", RAY_TEMP_DIR, "--num-cpus", str(RAY_NUM_CPUS),
           "--include-dashboard", "false", "--disable-usage-stats",
           "--object-store-memory", str(256 << 20)]
    for flag, port in RAY_PORTS.items():
        cmd += [flag, str(port)]
    return procs.start("ray", cmd, _ray_env(transport), log)


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


def serve_document(model_path: str, keys: list[str], stream_batch_ms: float | None,
                   rayllm_pythonpath: str | None = None) -> dict[str, Any]:
    """One Serve config with B, C and D as applications under their route prefixes."""
    from serve_app.app import serve_config

    model: dict[str, Any] = {"name": MODEL_NAME, "model": MODEL_SOURCE, "pinned": True,
                             "engine_kwargs": ENGINE_KWARGS, "env": ENGINE_ENV}
    if stream_batch_ms is not None:
        model["stream_batch_ms"] = stream_batch_ms
    apps: list[dict[str, Any]] = []
    by_key = {t.key: t for t in TARGETS}
    for key, args in (("roundhouse", {}), ("gateway", gateway_args())):
        if key in keys:
            app = serve_config({"models": [model], **args}, SERVE_PORT,
                               app_name=f"overhead-{key}")["applications"][0]
            apps.append(app | {"route_prefix": by_key[key].prefix})
    if "rayllm" in keys:
        # Ray Serve LLM imports pyarrow (ray[llm]), which Roundhouse's environment lacks: from
        # a directory of its own, for this application only (the app's runtime_env for the
        # build task, the LLMConfig's for the server replica, whose runtime_env replaces the
        # app's env_vars rather than adding to them).
        extra = {"PYTHONPATH": rayllm_pythonpath} if rayllm_pythonpath else {}
        app = {
            "name": "overhead-rayllm", "route_prefix": by_key["rayllm"].prefix,
            "import_path": "ray.serve.llm:build_openai_app",
            "args": {"llm_configs": [{
                "model_loading_config": {"model_id": MODEL_NAME, "model_source": model_path},
                "accelerator_config": {"kind": "cpu"},
                # Stats off as on A (--disable-log-stats) and B/C (Roundhouse's default);
                # Ray Serve LLM refuses that with its engine metrics on.
                "engine_kwargs": ENGINE_KWARGS | {"disable_log_stats": True},
                "log_engine_metrics": False,
                "runtime_env": {"env_vars": ENGINE_ENV | extra},
            }]},
        }
        if extra:
            app["runtime_env"] = {"env_vars": extra}
        apps.append(app)
    return {"proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": SERVE_PORT},
            "applications": apps}


def deploy(document: dict[str, Any], pin: str | None, log: Path) -> None:
    path = RESULTS / "overhead-serve-config.json"
    path.write_text(json.dumps(document, indent=2))
    with log.open("ab") as out:
        subprocess.run([*_taskset(pin), sys.executable, "-c", _DEPLOY,
                        f"127.0.0.1:{RAY_PORT}", str(path)],
                       env=_ray_env({}), stdout=out, stderr=subprocess.STDOUT, check=True,
                       timeout=600)


def base_url(target: Target) -> str:
    port = DIRECT_PORT if target.key == "vllm" else SERVE_PORT
    return f"http://127.0.0.1:{port}{target.prefix}"


def warm_up(target: Target, endpoint: str, max_tokens: int = 4) -> None:
    """One short request of a prompt the benchmark never sends (it leaves the measured prompts
    out of the prefix cache, unlike the bench's own warm-up, which sends the first of them)."""
    text = "Name three colours of the rainbow."
    body: dict[str, Any] = {"model": target.model, "max_tokens": max_tokens}
    if endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    _post(base_url(target) + endpoint, body, target.api_key)


def wait_ready(targets: list[Target], watched: list[Any], timeout_s: float) -> dict[str, float]:
    """Polls each target with a real completion until it answers; seconds each took."""
    started = time.monotonic()
    ready: dict[str, float] = {}
    last_error: dict[str, str] = {}
    while len(ready) < len(targets):
        for proc in watched:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} before "
                                   "every target was ready (see the logs)")
        for target in targets:
            if target.key in ready:
                continue
            try:
                warm_up(target, "/v1/completions", max_tokens=1)
                ready[target.key] = round(time.monotonic() - started, 1)
                print(f"  {target.letter} {target.label} ready after {ready[target.key]} s",
                      flush=True)
            except (OSError, urllib.error.URLError) as exc:
                last_error[target.key] = repr(exc)[:200]
        if time.monotonic() - started > timeout_s:
            missing = {t.key: last_error.get(t.key) for t in targets if t.key not in ready}
            raise TimeoutError(f"not ready after {timeout_s} s: {missing}")
        if len(ready) < len(targets):
            time.sleep(3)  # readiness polling interval (engines take about a minute each)
    return ready


# --- the benchmark client -------------------------------------------------------------------

class BenchClient:
    def __init__(self, procs: Processes, pin: str | None, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        self._proc = procs.start("bench-client", [*_taskset(pin), sys.executable, "-c",
                                                  _BENCH_CLIENT], env, log, pipes=True)
        self._buffer = b""
        answer = self._answer(300)
        if answer != "ready":
            raise RuntimeError(f"bench client did not start: {answer!r}")

    def _answer(self, timeout_s: float) -> str:
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"bench client: no answer in {timeout_s:.0f} s")
            readable, _, _ = select.select([self._proc.stdout], [], [], left)
            if readable:
                chunk = os.read(self._proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError("bench client exited (see its log)")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def run(self, argv: list[str], timeout_s: float) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(argv) + "\n").encode())
        answer = self._answer(timeout_s)
        if answer != "ok":
            raise RuntimeError(f"vllm bench failed: {answer} (see overhead-bench-client.log)")


def run_workload(client: BenchClient, target: Target, workload: Workload, prompts: int,
                 seed: int, tokenizer: str, name: str) -> dict[str, Any]:
    argv = ["--backend", workload.backend, "--base-url", base_url(target),
            "--endpoint", workload.endpoint, "--model", target.model, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(INPUT_LEN),
            "--random-output-len", str(OUTPUT_LEN), "--ignore-eos",
            "--num-prompts", str(prompts), "--max-concurrency", str(workload.concurrency),
            "--seed", str(seed), "--num-warmups", "0", "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--save-result", "--result-dir", str(RAW), "--result-filename", name]
    if target.api_key:
        argv += ["--header", f"Authorization=Bearer {target.api_key}"]
    (RAW / name).unlink(missing_ok=True)
    warm_up(target, workload.endpoint)
    # Generous: a concurrency-1 request takes ~4 s here, 64 at concurrency 16 ~70 s.
    client.run(argv, timeout_s=120 + prompts * 30 / workload.concurrency)
    data = json.loads((RAW / name).read_text())
    metrics = {k: data.get(k) for k in METRICS}
    if metrics["failed"] or metrics["completed"] != prompts:
        raise RuntimeError(f"{name}: {metrics['failed']} requests failed, "
                           f"{metrics['completed']} of {prompts} completed")
    return metrics


# --- what the machine was doing -------------------------------------------------------------

def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def foreign_processes(ours: dict[str, int]) -> list[str]:
    """pytest runs and vLLM servers on this machine that this run did not start."""
    sessions = set(ours.values())
    found = []
    out = subprocess.run(["pgrep", "-af", "pytest|api_server"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        pid = int(line.split()[0])
        stat = _proc_stat(pid)
        if pid != os.getpid() and stat is not None and stat[2] not in sessions:
            found.append(line[:160])
    return found


def _thread_cpus(pid: int) -> list[tuple[str, str]]:
    """(allowed-CPU list, name) of each thread of a process."""
    threads = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                status = dict(line.split(":\t", 1) for line in
                              (task / "status").read_text().splitlines() if ":\t" in line)
                threads.append((status["Cpus_allowed_list"].strip(), status["Name"].strip()))
    return threads


def placement(procs: Processes) -> dict[str, Any]:
    """Where this run's processes may run: per session (vllm-server, ray, ...), threads by
    allowed-CPU list, and the processes with threads bound to the engines' core alone."""
    sessions: dict[str, dict[str, int]] = {}
    on_core: dict[str, int] = {}
    for name, sid in procs.sessions().items():
        counts: dict[str, int] = {}
        for pid in _session_pids(sid):
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                for cpus, _thread in _thread_cpus(pid):
                    counts[cpus] = counts.get(cpus, 0) + 1
                    if cpus == ENGINE_CORE:
                        where = f"{name}: {comm} (pid {pid})"
                        on_core[where] = on_core.get(where, 0) + 1
        sessions[name] = counts
    return {"threads_by_allowed_cpus": sessions,
            f"threads_on_core_{ENGINE_CORE}_only": on_core}


# --- the numbers ----------------------------------------------------------------------------

def compare(rounds: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric, workload, kind in COMPARISONS:
        entry: dict[str, Any] = {"metric": metric, "workload": workload, "kind": kind}
        for x, y in PAIRS:
            if x not in keys or y not in keys:
                continue
            values = []
            for r in rounds:
                a, b = r["results"][x][workload][metric], r["results"][y][workload][metric]
                values.append(a / b if kind == "ratio" else a - b)
            entry[f"{x}/{y}"] = {"median": statistics.median(values), "min": min(values),
                                 "max": max(values), "per_round": values}
        out[f"{metric}@{workload}"] = entry
    return out


def goals(comparisons: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for metric, workload, (x, y), op, bound, text in GOALS:
        pair = comparisons[f"{metric}@{workload}"].get(f"{x}/{y}")
        if pair is None:
            continue
        value = pair["median"]
        met = value >= bound if op == ">=" else value <= bound
        rows.append({"goal": text, "op": op, "bound": bound, "median": value,
                     "min": pair["min"], "max": pair["max"], "met": met})
    return rows


def _fmt(value: float, kind: str) -> str:
    return f"{value:+.1f} ms" if kind == "delta" else f"{value:.3f}"


def _cpu_cell(cpu: dict[str, float]) -> str:
    parts = [f"{cpu[name]:.0f}" if name in cpu else "-"
             for name in ("vllm-server", "ray", "bench-client", "others")]
    return " / ".join(parts) + f", in {cpu['wall_s']:.0f}"


def markdown(report: dict[str, Any]) -> str:
    keys = report["settings"]["targets"]
    by_key = {t.key: t for t in TARGETS}
    lines = [f"Run {report['when']}: {report['settings']['rounds']} round(s), "
             f"{report['wall_s'] / 60:.1f} min, Ray/client pinned to "
             f"{report['settings']['pin_ray'] or 'nothing'}, load average "
             f"{report['load']['before']} before, {report['load']['after']} after", ""]
    pairs = [f"{x}/{y}" for x, y in PAIRS if x in keys and y in keys]
    letters = [f"{by_key[p.split('/')[0]].letter}/{by_key[p.split('/')[1]].letter}"
               for p in pairs]
    if pairs:
        lines.append("| measure (median of rounds, min..max) | " + " | ".join(letters) + " |")
        lines.append("|---|" + "---:|" * len(pairs))
    for entry in report["comparisons"].values() if pairs else ():
        kind = entry["kind"]
        label = (f"{METRIC_LABELS[entry['metric']]} "
                 f"({'difference' if kind == 'delta' else 'ratio'}), "
                 f"{next(w.label for w in WORKLOADS if w.key == entry['workload'])}")
        cells = []
        for pair in pairs:
            p = entry.get(pair)
            cells.append("-" if p is None else f"{_fmt(p['median'], kind)} "
                         f"({_fmt(p['min'], kind)}..{_fmt(p['max'], kind)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if report["goals"]:
        lines += ["", "| target (issue 17) | median | spread | met |", "|---|---:|---:|---|"]
    for g in report["goals"]:
        kind = "delta" if "ttft" in g["goal"].lower() else "ratio"
        lines.append(f"| {g['goal']} | {_fmt(g['median'], kind)} | "
                     f"{_fmt(g['min'], kind)}..{_fmt(g['max'], kind)} | "
                     f"{'yes' if g['met'] else 'no'} |")
    lines += ["", "| round | target | c16 out tok/s | c1 TTFT p50 ms | c1 TPOT p50 ms | "
              "chat TTFT p50 ms | chat ITL p50 ms | chat ITL p99 ms | load avg (1 min) | "
              "CPU s: A's server / Ray (B, C, D) / client / rest of the machine, in wall s |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rounds"]:
        for key in keys:
            m = r["results"][key]
            lines.append(
                f"| {r['round']} | {by_key[key].letter} {by_key[key].label} | "
                f"{m['completions_c16']['output_throughput']:.1f} | "
                f"{m['completions_c1']['median_ttft_ms']:.0f} | "
                f"{m['completions_c1']['median_tpot_ms']:.1f} | "
                f"{m['chat_c1']['median_ttft_ms']:.0f} | {m['chat_c1']['median_itl_ms']:.1f} | "
                f"{m['chat_c1']['p99_itl_ms']:.1f} | {r['load'][key][0]:.2f} | "
                f"{_cpu_cell(r['cpu_s'][key])} |")
    gw = report.get("gateway_cost_in_process_us")
    if gw:
        lines.append("")
        for part, q in gw.items():
            lines.append(f"gateway work per request in process, {part}: p50 {q['p50']} us, "
                         f"p99 {q['p99']} us")
    return "\n".join(lines)


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
    prompts = [tok.decode([rng.randrange(tok.vocab_size) for _ in range(INPUT_LEN)])
               for _ in range(200)]
    bodies = [{"model": "auto", "prompt": p, "max_tokens": OUTPUT_LEN} for p in prompts]
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
        limiter.charge_tokens(principal.name, principal.limits, INPUT_LEN + OUTPUT_LEN, started)
        gate.append((checked - started) * 1e6)
        routing.append((time.perf_counter() - checked) * 1e6)

    def pct(samples: list[float]) -> dict[str, float]:
        samples.sort()
        return {"p50": round(samples[len(samples) // 2], 1),
                "p99": round(samples[int(len(samples) * 0.99)], 1)}

    return {"auth_and_limits": pct(gate), "routing": pct(routing)}


def versions() -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("vllm", "ray", "torch", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out["roundhouse_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
            check=True).stdout.strip()
        out["roundhouse_dirty_files"] = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
            capture_output=True, text=True, check=True).stdout.split("\n")[:-1]
    return out


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_gib": round(mem_kb / 2**20, 1),
            "platform": platform.platform(), "host": platform.node()}


# --- the run --------------------------------------------------------------------------------

def _transport(args: argparse.Namespace) -> dict[str, str]:
    """Serve's transport for B, C and D: what `make serve` starts Ray with (HAProxy front,
    direct ingress, gRPC between deployments), or Serve's defaults with --serve-defaults."""
    from serve_app.app import SERVE_TRANSPORT_ENV, transport_ports_env

    return {} if args.serve_defaults else (
        SERVE_TRANSPORT_ENV | transport_ports_env(20440, 22200))


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def measure(args: argparse.Namespace, model_path: str, procs: Processes) -> dict[str, Any]:
    keys = [t.key for t in TARGETS if t.letter in args.targets]
    targets = [t for t in TARGETS if t.key in keys]
    pin = args.pin_ray
    logs = {name: RESULTS / f"overhead-{name}.log" for name in
            ("vllm-server", "ray", "deploy", "bench-client")}
    for log in logs.values():
        log.write_bytes(b"")
    if args.require_quiet and (foreign := foreign_processes({})):
        raise RuntimeError(f"--require-quiet: other tests/benchmarks are running: {foreign}")
    watched = []
    print(f"starting targets {' '.join(t.letter for t in targets)} "
          f"(Ray/client pinned to {pin or 'nothing'})", flush=True)
    started = time.monotonic()
    if "vllm" in keys:
        watched.append(start_vllm_server(procs, model_path, pin, logs["vllm-server"]))
    if set(keys) - {"vllm"}:
        ray_proc = start_ray(procs, pin, logs["ray"], _transport(args))
        watched.append(ray_proc)
        deploy(serve_document(model_path, keys, args.stream_batch_ms, args.rayllm_pythonpath),
               pin, logs["deploy"])
    ready = wait_ready(targets, watched, READY_TIMEOUT_S)
    startup_s = time.monotonic() - started
    where = placement(procs)
    print(f"threads by allowed CPUs: {where['threads_by_allowed_cpus']}; bound to core "
          f"{ENGINE_CORE} alone: {where[f'threads_on_core_{ENGINE_CORE}_only']}", flush=True)
    client = BenchClient(procs, pin, logs["bench-client"])
    prompts = {"completions_c16": args.prompts_c16, "completions_c1": args.prompts_c1,
               "chat_c1": args.prompts_c1}
    rounds: list[dict[str, Any]] = []
    for r in range(1, args.rounds + 1):
        foreign = foreign_processes(procs.sessions())
        if foreign:
            print(f"warning: other benchmarks/tests are running: {foreign}", flush=True)
        round_: dict[str, Any] = {"round": r, "foreign_processes": foreign, "results": {},
                                  "load": {}}
        round_["cpu_s"] = {}
        for target in targets:
            if args.require_quiet and (foreign := foreign_processes(procs.sessions())):
                raise RuntimeError(f"--require-quiet: other tests/benchmarks started: {foreign}")
            round_["load"][target.key] = load_average()
            round_["results"][target.key] = {}
            cpu_before, wall_before = procs.cpu_s(), time.monotonic()
            for i, workload in enumerate(WORKLOADS):
                t0 = time.monotonic()
                m = run_workload(client, target, workload, prompts[workload.key],
                                 seed=r * 10 + i, tokenizer=model_path,
                                 name=f"overhead-r{r}-{target.key}-{workload.key}.json")
                round_["results"][target.key][workload.key] = m
                print(f"round {r} {target.letter} {target.label:<23} {workload.key:<16} "
                      f"{m['output_throughput']:6.1f} tok/s  TTFT p50 "
                      f"{m['median_ttft_ms']:6.0f} ms  ITL p50 {m['median_itl_ms']:5.1f} ms  "
                      f"({time.monotonic() - t0:.0f} s, load {load_average()[0]:.2f})",
                      flush=True)
            # Which of this run's process groups used the CPU while this target was measured
            # (the ray session holds B, C and D), against the wall time it took.
            cpu_after = procs.cpu_s()
            cpu = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
            # "others": what the rest of the machine used meanwhile (this script's own process,
            # the kernel, and anything else running here: it should be near 0).
            cpu["others"] = cpu["machine"] - sum(v for k, v in cpu.items() if k != "machine")
            round_["cpu_s"][target.key] = {"wall_s": round(time.monotonic() - wall_before, 1),
                                           **{k: round(v, 1) for k, v in cpu.items()}}
        rounds.append(round_)
    return {"rounds": rounds, "ready_s": ready, "startup_s": round(startup_s, 1),
            "placement": where, "keys": keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts-c16", type=int, default=64,
                        help="prompts of the concurrency-16 completions run")
    parser.add_argument("--prompts-c1", type=int, default=8,
                        help="prompts of each concurrency-1 run (completions, chat)")
    parser.add_argument("--pin-ray", metavar="CPUS", default=PIN_DEFAULT,
                        help="taskset CPU list for the Ray cluster, the bench client and "
                        "target A's server ('none': no pinning)")
    parser.add_argument("--targets", nargs="+", default=[t.letter for t in TARGETS],
                        choices=[t.letter for t in TARGETS])
    parser.add_argument("--stream-batch-ms", type=float, default=None,
                        help="Roundhouse's stream_batch_ms for B and C (default: the model "
                        "config's default)")
    parser.add_argument("--rayllm-pythonpath", metavar="DIR", default=RAYLLM_PYTHONPATH,
                        help="where target D finds pyarrow (Ray Serve LLM needs it; install "
                        "with `pip install --target DIR pyarrow`) if the environment lacks it; "
                        "default %(default)s")
    parser.add_argument("--serve-defaults", action="store_true",
                        help="run B, C and D on Serve's default transport (Python proxy, Ray "
                        "actor calls) instead of `roundhouse ray-env`'s")
    parser.add_argument("--require-quiet", action="store_true",
                        help="stop (without results) as soon as a pytest run or a vLLM server "
                        "of someone else shows up on this machine")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 round, 16 prompts at concurrency 16, 2 at 1")
    parser.add_argument("--output", type=Path, default=RESULTS / "overhead.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.prompts_c16, args.prompts_c1 = 1, 16, 2
    if args.pin_ray in ("none", ""):
        args.pin_ray = None
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if "D" in args.targets:
        import importlib.util

        if importlib.util.find_spec("pyarrow") is not None:
            args.rayllm_pythonpath = None
        elif not (Path(args.rayllm_pythonpath) / "pyarrow").is_dir():
            parser.error(f"target D (Ray Serve LLM) needs pyarrow, missing here: run "
                         f"`{sys.executable} -m pip install --target {args.rayllm_pythonpath} "
                         "pyarrow` (or leave D out: --targets A B C)")

    from serve_app.config import ModelConfig
    from serve_app.local_models import resolve_model_path

    model_path = resolve_model_path(MODEL_SOURCE)
    if not Path(model_path).exists():
        print("run `roundhouse prepare-models` (or make bench) first", file=sys.stderr)
        return 1
    RAW.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = load_average()
    started = time.monotonic()
    procs = Processes()
    try:
        measured = measure(args, model_path, procs)
    finally:
        print("stopping the targets", flush=True)
        procs.stop_all()
    wall_s = time.monotonic() - started
    load_after = load_average()
    gateway_us = gateway_cost_us(model_path) if "C" in args.targets else None

    keys = measured["keys"]
    comparisons = compare(measured["rounds"], keys)
    report = {
        "benchmark": "overhead",
        "when": when,
        "wall_s": round(wall_s, 1),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "rounds": args.rounds, "quick": args.quick, "targets": keys,
            "target_labels": {t.key: f"{t.letter} {t.label}" for t in TARGETS if t.key in keys},
            "pin_ray": args.pin_ray, "serve_transport_env": _transport(args),
            "workloads": {w.key: {"label": w.label, "backend": w.backend,
                                  "endpoint": w.endpoint, "concurrency": w.concurrency,
                                  "num_prompts": {"completions_c16": args.prompts_c16}.get(
                                      w.key, args.prompts_c1)} for w in WORKLOADS},
            "dataset": "random", "input_len": INPUT_LEN, "output_len": OUTPUT_LEN,
            "ignore_eos": True, "seed": "round * 10 + workload index",
            "model": f"{MODEL_SOURCE} ({model_path})", "engine_kwargs": ENGINE_KWARGS,
            "engine_env": ENGINE_ENV,
            "stream_batch_ms": (args.stream_batch_ms if args.stream_batch_ms is not None
                                else ModelConfig.model_fields["stream_batch_ms"].default),
            "ray_num_cpus": RAY_NUM_CPUS,
        },
        "startup_s": measured["startup_s"],
        "ready_s": measured["ready_s"],
        "placement": measured["placement"],
        "load": {"before": load_before, "after": load_after},
        "rounds": measured["rounds"],
        "comparisons": comparisons,
        "goals": goals(comparisons),
        "gateway_cost_in_process_us": gateway_us,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown(report))
    return 0


@contextlib.contextmanager
def roundhouse(log: Path, limits: dict[str, Any] | None = None,
               engine_kwargs: dict[str, Any] | None = None,
               env: dict[str, str] | None = None,
               app_args: dict[str, Any] | None = None) -> Iterator[str]:
    """`serve run` of Roundhouse with the one local model (pinned) as `chat`, waiting until the
    engine answers; `limits` are the model's admission limits, `engine_kwargs` and `env` replace
    ENGINE_KWARGS and ENGINE_ENV, `app_args` are more app args. Used by benchmarks/spike.py."""
    from serve_app.app import serve_config

    model: dict[str, Any] = {"name": MODEL_NAME, "model": MODEL_SOURCE,
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
        key = GATEWAY_KEY if (app_args or {}).get("auth") else None
        _post(f"{base}/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1},
              key)
        yield base
    finally:
        _stop(proc)
        config_path.unlink(missing_ok=True)


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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stops a process started with start_new_session=True and its group (cold_start.py,
    roundhouse())."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


if __name__ == "__main__":
    sys.exit(main())
