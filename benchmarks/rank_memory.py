"""Peak memory of a process, sampled by a thread: private memory (RssAnon), proportional share (Pss) and the
kernel's own high-water mark of the resident set (VmHWM). Linux only (/proc/self).

Used as a wrapper that a launcher starts on every rank (benchmarks/scale_memory.py)::

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/rank_memory.py <out dir> -m fastted distil ...

runs ``-m <module> <args>`` (or ``<script> <args>``) in this process with a sampler around it and writes
``<out dir>/rank-<RANK>.json``: ``{"rank", "exit_code", "seconds", "start_kib", "peak_kib", "samples", "pss_samples"}``,
``start_kib`` and ``peak_kib`` holding ``RssAnon``, ``Pss`` and ``VmHWM`` in KiB (also when the program ends through
``os._exit``, as the fastted command ends a distributed run). RssAnon counts pages only this
process maps (its heap, the weights it copied); Pss adds shared pages (memory-mapped safetensors, the GGUF
file) split evenly between the processes that map them; VmHWM is the peak RSS, shared pages counted whole.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import time

FIELDS = ("RssAnon", "Pss", "VmHWM")


def status_kib(fields=("RssAnon", "VmHWM")) -> dict:
    """The named fields of /proc/self/status, in KiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in fields:
                values[key] = int(rest.split()[0])
    return values


def pss_kib() -> int:
    """The proportional set size of this process (/proc/self/smaps_rollup), in KiB."""
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError("no Pss in /proc/self/smaps_rollup")


def sample(fields=FIELDS) -> dict:
    values = status_kib(tuple(f for f in fields if f != "Pss"))
    if "Pss" in fields:
        values["Pss"] = pss_kib()
    return values


class PeakSampler:
    """A context that samples ``fields`` in a thread; ``start`` holds the values on entry, ``peak`` the largest
    seen (a last sample is taken on exit), both in KiB.

    RssAnon and VmHWM (/proc/self/status, microseconds to read) are read every ``interval`` seconds. Pss walks
    the page tables (about 30 ms per GiB resident): it is read every ``interval`` seconds or, when a read takes
    longer, so that reading it keeps the thread busy at most ``pss_share`` of the time, and besides whenever
    RssAnon has grown 5 % past its value at the last Pss read (a load in progress)."""

    def __init__(self, fields=FIELDS, interval: float = 0.02, pss_share: float = 0.1):
        self.fields, self.interval, self.pss_share = tuple(fields), interval, pss_share
        self.start: dict = {}
        self.peak: dict = {}
        self.samples = self.pss_samples = 0
        self._next_pss = 0.0
        self._anon_at_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _take(self, force_pss: bool = False) -> None:
        values = status_kib(tuple(f for f in self.fields if f != "Pss"))
        now = time.perf_counter()
        growing = values.get("RssAnon", 0) > 1.05 * self._anon_at_pss
        if "Pss" in self.fields and (force_pss or growing or now >= self._next_pss):
            values["Pss"] = pss_kib()
            self._anon_at_pss = values.get("RssAnon", 0)
            took = time.perf_counter() - now
            self._next_pss = now + max(self.interval, took / self.pss_share)
            self.pss_samples += 1
        for key, value in values.items():
            self.peak[key] = max(self.peak.get(key, 0), value)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> PeakSampler:
        self.start = sample(self.fields)
        self.peak = dict(self.start)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._take(force_pss=True)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: rank_memory.py <out dir> (-m <module> | <script>) [args...]", file=sys.stderr)
        return 2
    out, target = argv[0], argv[1:]
    if target[0] == "-m":
        if len(target) < 2:
            print("rank_memory.py: -m needs a module name", file=sys.stderr)
            return 2
        name, args = target[1], target[2:]
        run = lambda: runpy.run_module(name, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        name, args = target[0], target[1:]
        run = lambda: runpy.run_path(name, run_name="__main__")  # noqa: E731
    sys.argv = [name, *args]
    began = time.perf_counter()
    sampler = PeakSampler()
    exit_now = os._exit

    def write(code: int) -> None:
        sampler.__exit__()
        rank = int(os.environ.get("RANK", "0"))
        os.makedirs(out, exist_ok=True)
        record = {
            "rank": rank,
            "exit_code": code,
            "seconds": round(time.perf_counter() - began, 2),
            "start_kib": sampler.start,
            "peak_kib": sampler.peak,
            "samples": sampler.samples,
            "pss_samples": sampler.pss_samples,
        }
        with open(os.path.join(out, f"rank-{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)

    def record_then_exit(code: int) -> None:  # the fastted command ends a distributed run with os._exit
        write(code)
        exit_now(code)

    os._exit = record_then_exit
    sampler.__enter__()
    code = 0
    try:
        run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os._exit = exit_now
    write(code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
