"""The seed's failure mode on the local model: mixed traffic in which one request in ten asks for
an output 8x longer than the rest, with Roundhouse's KV admission on versus off, in one run.

One SmolLM2 engine (float32, eager, one core) with a KV cache of `--kv-mib` MiB (~46 KB per token,
so 256 MiB holds ~5.8k tokens) behind Roundhouse, deployed twice with the same settings except
`limits.admission`. A client keeps `--concurrency` streaming completions in flight, prompts of
`--prompt-words` words, outputs of `--short` tokens and every tenth of `--long` tokens
(`ignore_eos`). Long requests live 8x longer, so they pile up: without admission they fill the
cache, vLLM preempts and recomputes, and short requests wait for blocks; with it, long ones hold
at most `large_request_share` of the budget and short ones keep the rest. Measured per mode:
time to first token of the short requests (p50/p99, leaving out the first `--concurrency`
requests, the cold burst on an empty server; the whole run's beside them), output throughput,
refusals (429 are declared statuses, counted). Writes benchmarks/results/spike.json and every
request's numbers to benchmarks/results/raw/spike-*.json.

Targets (issue 6): short-request p99 TTFT with admission on <= 0.5x of off; total throughput
>= 0.9x of off.

    python benchmarks/spike.py [--requests 240] [--concurrency 32] [--kv-mib 256]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
RESULTS = REPO / "benchmarks" / "results"
MODEL = "chat"  # overhead.MODEL_NAME: the model overhead.roundhouse serves
WORDS = ("river stone light garden window paper music winter harbor candle forest market "
         "silver thunder meadow bridge lantern orchard valley whisper").split()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def engine_settings(kv_mib: int) -> tuple[dict[str, Any], dict[str, str]]:
    import overhead

    # kv_cache_memory_bytes sizes the cache below VLLM_CPU_KVCACHE_SPACE's 1 GiB steps.
    env = {k: v for k, v in overhead.ENGINE_ENV.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    return overhead.ENGINE_KWARGS | {"kv_cache_memory_bytes": kv_mib << 20}, env


def roundhouse(admission: bool, log: Path, kv_mib: int) -> contextlib.AbstractContextManager[str]:
    from overhead import roundhouse as serve_roundhouse  # the same launch as overhead.py

    engine_kwargs, env = engine_settings(kv_mib)
    return serve_roundhouse(log, {"admission": admission, "max_queued_requests": 1000,
                                  "queue_timeout_s": 600, "request_timeout_s": 900},
                            engine_kwargs, env)


async def _one(client: httpx.AsyncClient, base: str, prompt: str, max_tokens: int
               ) -> dict[str, Any]:
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return {"status": resp.status_code, "ttft_s": None,
                    "tokens": 0, "elapsed_s": time.perf_counter() - started}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                if first is None:
                    first = time.perf_counter() - started
                tokens += 1
    return {"status": 200, "ttft_s": first, "tokens": tokens,
            "elapsed_s": time.perf_counter() - started}


async def _traffic(base: str, requests: int, concurrency: int, prompt_words: int, short: int,
                   long: int) -> dict[str, Any]:
    rng = random.Random(0)
    plan = [(" ".join(rng.choice(WORDS) for _ in range(prompt_words)),
             long if i % 10 == 9 else short) for i in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        async def run(i: int, prompt: str, max_tokens: int) -> dict[str, Any]:
            async with gate:
                result = await _one(client, base, prompt, max_tokens)
            result["long"] = max_tokens == long
            result["index"] = i  # plan order = start order (the gate is first come first served)
            return result

        started = time.perf_counter()
        results = await asyncio.gather(*(run(i, p, m) for i, (p, m) in enumerate(plan)))
        wall = time.perf_counter() - started

    def short_ttft(rows: list[dict[str, Any]]) -> list[float]:
        return [r["ttft_s"] for r in rows if not r["long"] and r["ttft_s"] is not None]

    # The first `concurrency` requests hit an empty server all at once; that cold burst is
    # not the steady mix the targets are about, so the percentiles leave it out (and the
    # whole run's are reported beside them).
    steady = short_ttft([r for r in results if r["index"] >= concurrency])
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": requests, "wall_s": round(wall, 1),
        "statuses": {str(s): sum(r["status"] == s for r in results)
                     for s in sorted({r["status"] for r in results})},
        "output_tokens": tokens, "output_tok_per_s": round(tokens / wall, 1),
        "short_ttft_p50_s": _round(_percentile(steady, 0.5)),
        "short_ttft_p99_s": _round(_percentile(steady, 0.99)),
        "all_short_ttft_p50_s": _round(_percentile(short_ttft(results), 0.5)),
        "all_short_ttft_p99_s": _round(_percentile(short_ttft(results), 0.99)),
        "per_request": [{k: (_round(v) if isinstance(v, float) else v) for k, v in r.items()}
                        for r in results],
        "long_ttft_max_s": _round(max((r["ttft_s"] for r in results
                                       if r["long"] and r["ttft_s"] is not None), default=None)),
        "long_elapsed_p50_s": _round(_percentile(
            [r["elapsed_s"] for r in results if r["long"] and r["status"] == 200], 0.5)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=120)
    parser.add_argument("--short", type=int, default=64)
    parser.add_argument("--long", type=int, default=512)
    parser.add_argument("--kv-mib", type=int, default=256)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    for label, admission in (("admission_off", False), ("admission_on", True)):
        print(f"[spike] {label}: starting Roundhouse", file=sys.stderr, flush=True)
        with roundhouse(admission, RESULTS / f"spike-{label}.log", args.kv_mib) as base:
            runs[label] = asyncio.run(_traffic(base, args.requests, args.concurrency,
                                               args.prompt_words, args.short, args.long))
        rows = runs[label].pop("per_request")
        (RESULTS / "raw").mkdir(exist_ok=True)
        (RESULTS / "raw" / f"spike-{label}.json").write_text(json.dumps(rows) + "\n")
        print(f"[spike] {label}: {runs[label]}", file=sys.stderr, flush=True)
    on, off = runs["admission_on"], runs["admission_off"]
    ratios = {
        "short_ttft_p99_on_vs_off": (round(on["short_ttft_p99_s"] / off["short_ttft_p99_s"], 3)
                                     if on["short_ttft_p99_s"] and off["short_ttft_p99_s"]
                                     else None),
        "throughput_on_vs_off": round(on["output_tok_per_s"] / off["output_tok_per_s"], 3),
    }
    engine_kwargs, env = engine_settings(args.kv_mib)
    result = {"benchmark": "spike", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": vars(args) | {"engine_kwargs": engine_kwargs, "env": env},
              "runs": runs, "ratios": ratios,
              "targets": {"short_ttft_p99_on_vs_off": "<= 0.5", "throughput_on_vs_off": ">= 0.9"}}
    (RESULTS / "spike.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["runs"], indent=2))
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
