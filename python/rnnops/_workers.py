"""Python worker processes side by side: how the bench and the tuner compile kernels in parallel.

Each task is one ``python -c CODE ARGUMENT`` process (a fresh interpreter: nothing depends on
how the parent was started, unlike multiprocessing's spawn, which re-imports the parent's main
script), at most ``workers`` at once. A worker that crashes only loses its own task; one still
running after ``timeout_s``, or at ``deadline``, or on an interrupt, is killed with the
processes it started (a session of its own: a compiler it runs, e.g. nvcc under a peer's
torch.utils.cpp_extension build, must not go on taking CPU from the timings that follow).
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def _kill(worker: subprocess.Popen) -> None:
    """Kill ``worker`` and every process in its session, then reap it."""
    try:
        os.killpg(worker.pid, signal.SIGKILL)
    except (AttributeError, ProcessLookupError, PermissionError):  # no process groups here, or already gone
        worker.kill()
    worker.wait()


def run_side_by_side(code: str, arguments: Sequence[str], workers: int, *, timeout_s: float,
                     deadline: float = math.inf,
                     report: Callable[[int, int], None] = lambda finished, running: None) -> list[int | None]:
    """Run ``python -c code argument`` for each argument, ``workers`` at a time; returns each
    one's exit status, in order (None: killed, or never started). ``report(finished, running)``
    is called whenever those counts change; ``deadline`` is a time.perf_counter() value after
    which nothing starts and all are killed."""
    pending, running = list(enumerate(arguments)), {}  # worker -> (its index, when it started)
    statuses: list[int | None] = [None] * len(arguments)
    killed = set()
    finished = 0
    shown = None
    try:
        while pending or running:
            while pending and len(running) < max(1, workers) and time.perf_counter() < deadline:
                index, argument = pending.pop(0)
                worker = subprocess.Popen([sys.executable, "-c", code, argument], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
                running[worker] = index, time.perf_counter()
            if not running:
                break  # past the deadline with tasks never started
            time.sleep(0.1)
            now = time.perf_counter()
            for worker, (index, started) in list(running.items()):
                if worker.poll() is None and (now - started > timeout_s or now > deadline):
                    _kill(worker)
                    killed.add(index)
                if worker.poll() is not None:
                    del running[worker]
                    finished += 1
                    statuses[index] = None if index in killed else worker.returncode
            if (finished, len(running)) != shown:  # a report per change, not per poll
                shown = (finished, len(running))
                report(*shown)
    finally:
        for worker in running:
            _kill(worker)
    return statuses
