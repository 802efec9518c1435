"""Shared by the benchmarks: the step timer and the child-process runner.

Each framework is measured in its own process (thread pools and caches do not leak); a child prints
one ``RESULT {json}`` line, which ``spawn`` reads back.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time


def timeit(step, seconds=2.0, min_steps=10, warmup=3):
    """Median milliseconds of ``step()`` over at least ``seconds`` (and ``min_steps`` calls), after
    ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < min_steps:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def result(out: dict) -> None:
    """A child's answer: one line ``spawn`` reads."""
    print("RESULT " + json.dumps(out), flush=True)


def spawn(script, args, env, timeout=None):
    """Run ``python script *args`` in a fresh process; its ``RESULT`` dict, or ``None`` (the failure
    and the end of its stderr go to stderr; ``{"error": reason}`` is returned when the child printed
    one itself)."""
    try:
        proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{' '.join(args)}: timed out after {timeout} s", file=sys.stderr)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None
