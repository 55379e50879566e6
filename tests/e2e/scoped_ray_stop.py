"""`ray stop`, run over the processes of one Ray cluster only.

`ray stop` stops every Ray process on the machine, which would also stop a `make serve` server
or another test run beside this one. This runs Ray's own `ray stop` code (same process
matching, same signals, same order) with `psutil.process_iter` narrowed to the processes of
the cluster started with `--temp-dir TEMP_DIR`: the ones whose command line names it, and all
their descendants (workers, and the engine processes those start).

Usage: python -m tests.e2e.scoped_ray_stop TEMP_DIR
"""

from __future__ import annotations

import functools
import sys

import psutil


def cluster_processes(temp_dir: str) -> dict[int, float]:
    """pid -> create time of every process of the cluster started with `--temp-dir temp_dir`."""
    found: dict[int, float] = {}
    for root in psutil.process_iter(["cmdline"]):
        if temp_dir not in " ".join(root.info["cmdline"] or []):
            continue
        try:
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc.create_time()
        except psutil.Error:
            continue
    return found


def alive(processes: dict[int, float]) -> set[int]:
    """The ones still running (same pid and start time, not a zombie)."""
    left = set()
    for pid, created in processes.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                left.add(pid)
        except psutil.Error:
            continue
    return left


def main(temp_dir: str) -> None:
    import ray._common.utils
    from ray.scripts.scripts import cli

    ours = cluster_processes(temp_dir)
    every = psutil.process_iter
    psutil.process_iter = lambda *a, **k: [p for p in every(*a, **k)  # type: ignore[assignment]
                                           if ours.get(p.pid) == p.create_time()]
    # `ray stop` forgets the default cluster address; forget this cluster's instead.
    ray._common.utils.reset_ray_address = functools.partial(
        ray._common.utils.reset_ray_address, temp_dir)
    cli(["stop"], standalone_mode=False)


if __name__ == "__main__":
    main(sys.argv[1])
