"""Measurement primitives of the benchmark: repeated timing, summary statistics, peak memory, machine.

Every figure the benchmark reports is a :class:`Stats`: the median over ``repeats`` timed runs that
follow ``warmup`` untimed runs, with the minimum and maximum next to it. Ratios (A over B) are taken
per repeat from runs made side by side in the same benchmark (:func:`ratio_stats`), then summarised
the same way.

Peak memory: :class:`PeakMemory` samples the resident set size (RSS) of this process with ``psutil``
every few milliseconds while a case runs (the process-wide high-water mark
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is recorded too), and on CUDA reads
``torch.cuda.max_memory_allocated`` after resetting the peak counter at the start of the case.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements of one quantity.

    Attributes:
        median / min / max: in ``unit``; ``min <= median <= max``.
        n: number of measurements summarised (repeats, after warm-up).
        unit: e.g. ``"episodes/s"``, ``"ms/query"``, ``"s"``, ``"x"`` (a ratio), ``"MiB"``.
    """

    median: float
    min: float
    max: float
    n: int
    unit: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"median", "min", "max", "n", "unit"}``."""
        return asdict(self)


def summarize(values: Sequence[float], unit: str) -> Stats:
    """Median, minimum and maximum of ``values``.

    Args:
        values: one or more finite numbers (e.g. seconds per repeat).
        unit: unit of the values, copied into the result.

    Raises:
        ValueError: ``values`` is empty or holds a NaN/infinite value.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError(f"no measurements to summarise ({unit}); repeats must be >= 1")
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite measurement(s) {bad} in {unit} values {vals}")
    return Stats(median=statistics.median(vals), min=min(vals), max=max(vals), n=len(vals), unit=unit)


def ratio_stats(numerator: Sequence[float], denominator: Sequence[float], unit: str = "x") -> Stats:
    """Summary of the per-repeat ratios ``numerator[i] / denominator[i]`` (measured side by side).

    Raises:
        ValueError: the sequences differ in length or are empty, or a denominator is 0.
    """
    if len(numerator) != len(denominator):
        raise ValueError(f"ratio of {len(numerator)} and {len(denominator)} measurements: pair them one to one")
    if any(d == 0 for d in denominator):
        raise ValueError(f"ratio with a zero denominator in {list(denominator)}")
    return summarize([a / b for a, b in zip(numerator, denominator)], unit)


def time_calls(fn: Callable[[], Any], *, warmup: int, repeats: int,
               sync: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    Args:
        fn: the work to time (no arguments; its return value is ignored).
        warmup: untimed calls first (>= 0): caches, lazy initialisation, CUDA kernels selection.
        repeats: timed calls (>= 1).
        sync: called before starting and before stopping each clock (e.g. ``torch.cuda.synchronize``),
            so that asynchronous device work is inside the timed interval.

    Returns:
        ``repeats`` durations in seconds (``time.perf_counter``).

    Raises:
        ValueError: ``warmup < 0`` or ``repeats < 1``.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def rss_mib(pid: int | None = None) -> float:
    """Current resident set size of process ``pid`` (default: this one) in MiB (``psutil``)."""
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss / 2**20


def maxrss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """``getrusage(who).ru_maxrss`` in MiB (Linux reports KiB): this process's RSS high-water mark."""
    return resource.getrusage(who).ru_maxrss / 1024.0


class PeakMemory:
    """Context manager: peak RSS of this process (sampled) and peak CUDA allocation during the block.

    Usage::

        with PeakMemory(device) as mem:
            work()
        mem.result()  # {"rss_peak_mib", "rss_start_mib", "process_maxrss_mib", "cuda_max_allocated_mib"}

    The RSS is sampled every ``interval`` seconds by a daemon thread (short spikes between samples
    can be missed; ``process_maxrss_mib`` is the kernel's exact high-water mark for the whole process
    lifetime, so an upper bound). ``cuda_max_allocated_mib`` is ``None`` off CUDA.
    """

    def __init__(self, device: Any = "cpu", interval: float = 0.01) -> None:
        self.device = str(device)
        self.interval = interval
        self._peak = 0.0
        self._start = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda_peak: float | None = None

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process(os.getpid())
        while not self._stop.is_set():
            self._peak = max(self._peak, proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._start = self._peak = rss_mib()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, rss_mib())
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self._cuda_peak = torch.cuda.max_memory_allocated() / 2**20

    def result(self) -> dict[str, float | None]:
        """Peak figures in MiB (see class docstring)."""
        return {"rss_peak_mib": round(self._peak, 1), "rss_start_mib": round(self._start, 1),
                "process_maxrss_mib": round(maxrss_mib(), 1),
                "cuda_max_allocated_mib": None if self._cuda_peak is None else round(self._cuda_peak, 1)}


def cpu_seconds() -> float:
    """User + system CPU seconds used so far by this process and its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (``os.getloadavg``), ``None`` where unsupported."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: Any = "cpu") -> dict[str, Any]:
    """Where the figures were measured: CPU model and cores, memory, torch threads/version, GPU, OS.

    ``gpu`` is the CUDA device name (``None`` off CUDA).
    """
    import psutil
    import torch

    gpu = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": gpu, "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}"
    }


def run_logged(cmd: Sequence[str], cwd: Path, env: dict[str, str], log: Path,
               monitor: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None
               ) -> tuple[int, float, float, Any]:
    """Run ``cmd`` as a child process, its stdout and stderr appended to ``log`` (after a ``$ cmd`` line).

    Waits with ``os.wait4`` so that CPU time covers the process and the descendants it waited for.
    ``monitor(pid)``, when given, is entered around the wait (e.g. a memory sampler) and returned.
    A ``KeyboardInterrupt`` or other exception while waiting kills the child before re-raising.

    Returns:
        ``(exit code, wall seconds, CPU seconds (user + system), the entered monitor or None)``.
    """
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            with (monitor(proc.pid) if monitor else contextlib.nullcontext()) as watched:
                _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
    return os.waitstatus_to_exitcode(status), wall, usage.ru_utime + usage.ru_stime, watched
