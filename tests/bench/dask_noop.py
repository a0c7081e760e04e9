#!/usr/bin/env python3
"""No-op tasks through dask.distributed: the reference side of `bench-e2e`.

Starts a LocalCluster of WORKERS worker processes with THREADS threads each on
this machine, runs WARMUP tasks untimed, then TASKS tasks timed from the first
submit until every future is done, for each mode asked for:

- ``subprocess``: each task runs ``subprocess.run(["true"], capture_output=True)``,
  the same process per task that a sparegrid agent spawns for a ``true``
  subtask (whose stdout and stderr it also captures and reports);
- ``python``: each task is a pure-Python no-op (returns its argument), dask's
  own per-task overhead with no process spawned.

Progress goes to stderr once a second. Each mode's figure is one JSON line on
stdout: {"mode", "tasks", "seconds", "rate", "failed"}. Exit code 0 unless
the cluster could not start or a task failed.

Run by ``target/release/bench-e2e`` (``make bench-e2e``) with the venv's
python; usable alone too: ``python3 dask_noop.py --tasks 2000``.
"""

import argparse
import json
import logging
import subprocess
import sys
import time


def run_true(i):
    r = subprocess.run(["true"], capture_output=True)
    return r.returncode


def noop(i):
    return 0


MODES = {"subprocess": run_true, "python": noop}


def log(msg):
    print(f"  dask: {msg}", file=sys.stderr, flush=True)


def timed(client, fn, tasks, label):
    from distributed import wait

    t0 = time.perf_counter()
    futures = client.map(fn, range(tasks), pure=False)
    while True:
        try:
            wait(futures, timeout=1.0)
            break
        except TimeoutError:  # dask's is a subclass of the builtin (Python >= 3.11)
            done = sum(f.done() for f in futures)
            log(f"{label}: {done}/{tasks} done ({done / (time.perf_counter() - t0):.0f}/s)")
    seconds = time.perf_counter() - t0
    codes = client.gather(futures)
    failed = sum(1 for c in codes if c != 0)
    return seconds, failed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="threads per worker")
    p.add_argument("--tasks", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--modes", default="subprocess,python",
                   help="comma-separated: subprocess, python")
    a = p.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r} (known: {', '.join(MODES)})")
    if a.workers < 1 or a.threads < 1 or a.tasks < 1 or a.warmup < 0:
        p.error("--workers, --threads and --tasks must be at least 1, --warmup at least 0")

    import dask
    import distributed
    from distributed import Client, LocalCluster

    log(f"dask {dask.__version__}, distributed {distributed.__version__}: starting "
        f"LocalCluster({a.workers} worker processes x {a.threads} threads)")
    with LocalCluster(n_workers=a.workers, threads_per_worker=a.threads,
                      processes=True, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        client.wait_for_workers(a.workers, timeout=120)
        status = 0
        for m in modes:
            fn = MODES[m]
            if a.warmup:
                client.gather(client.map(fn, range(a.warmup), pure=False))
            seconds, failed = timed(client, fn, a.tasks, m)
            rate = a.tasks / seconds
            log(f"{m}: {a.tasks} tasks in {seconds:.2f} s = {rate:.0f}/s"
                + (f", {failed} FAILED" if failed else ""))
            print(json.dumps({"mode": m, "tasks": a.tasks, "seconds": seconds,
                              "rate": rate, "failed": failed}), flush=True)
            if failed:
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
