"""Measuring time and memory in a worker process, and capping a worker's memory with a cgroup.

A step's figures come from `/proc/self/status` (its peak RSS, VmHWM, reset before the timed calls)
or, on a GPU, from torch's allocator. The activation memory is the peak over the memory held right
after the model was loaded: what the step itself needed, over the weights (`model_held`). torch is
imported only where a GPU is read, so the runner can use this module without loading torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import threading
import time
from pathlib import Path

# The device the measurement steps run on (`--device`); `set_device` sets it in each worker.
DEVICE = "cpu"


def set_device(device: str) -> None:
    global DEVICE
    DEVICE = device


def on_gpu() -> bool:
    return DEVICE.startswith("cuda")


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS, so RSS counts live data only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """Samples RssAnon every 5 ms in a thread: the peak of memory that no file backs.

    VmHWM also counts the checkpoint's pages that a load maps from disk (RssFile); the kernel
    can drop those under pressure, so anonymous memory is what decides whether a load fits.
    """

    def __enter__(self):
        self.peak, self._stop = proc_status()["RssAnon"], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, proc_status()["RssAnon"])

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status()["RssAnon"])


def sync() -> None:
    """Wait for queued GPU work, so a wall time covers it (nothing on the CPU)."""
    if on_gpu():
        import torch

        torch.cuda.synchronize()


def gpu_allocated() -> int:
    """The GPU memory allocated now (0 on the CPU)."""
    if not on_gpu():
        return 0
    import torch

    sync()
    return torch.cuda.memory_allocated()


def gpu_reset() -> int:
    """On a GPU: reset its peak counter and return the memory allocated now (0 on the CPU)."""
    if on_gpu():
        import torch

        sync()
        torch.cuda.reset_peak_memory_stats()
    return gpu_allocated()


def gpu_peak() -> int:
    """The GPU's peak allocated memory since `gpu_reset` (0 on the CPU)."""
    if not on_gpu():
        return 0
    import torch

    sync()
    return torch.cuda.max_memory_allocated()


def timed(fn, repeat: int, warmup: bool = True) -> tuple[float, list[float]]:
    """Median wall time of `repeat` calls, after one warm-up call that is not counted."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def model_held() -> dict[str, int]:
    """The memory held right after the model is loaded: what a step's activation memory is counted over."""
    release_free_memory()
    return {"rss_model": proc_status()["VmRSS"], "gpu_model": gpu_allocated()}


class Kept:
    """`call` as a step to time: each call first drops the previous result, then keeps its own in `.out`.

    The result stays alive until the next call, so one result's memory counts at the peak, never two.
    """

    def __init__(self, call):
        self.call, self.out = call, None

    def __call__(self):
        self.out = None
        self.out = self.call()


def measure(fn, repeat: int, held: dict[str, int], warmup: bool = True) -> dict:
    """Time `fn` (`timed`) and read the peaks it reached: totals, over what was held before it, and over the model.

    `held` is `model_held()` read right after the load. `activation_bytes` is the peak over it, on
    the GPU where the step ran there, else in RSS.
    """
    release_free_memory()
    before = proc_status()
    reset_peak()
    gpu_before = gpu_reset()
    median, times = timed(fn, repeat, warmup)
    peak = proc_status()["VmHWM"]
    top = gpu_peak()
    return {
        "time_s": median,
        "times_s": times,
        "rss_before": before["VmRSS"],
        "peak_rss": peak,
        "peak_over_before": peak - before["VmRSS"],
        **held,
        "gpu_before": gpu_before,
        "gpu_peak": top,
        "activation_bytes": top - held["gpu_model"] if on_gpu() else peak - held["rss_model"],
    }


def measure_interleaved(fns: dict, repeat: int, held: dict[str, int], setup=None, warmup: bool = True) -> dict:
    """`measure` for several calls timed in turn: `repeat` rounds, each running every call once (the
    order reversed every other round), so that a busy machine slows them alike. Results are dropped
    at once, so one call's output never counts in another's peak; `setup[name]`, if given, runs
    before each call of `name`, untimed. Returns `measure`'s figures per name (peaks the largest over
    the rounds); `times_s` line up round by round, for paired ratios.
    """
    setup = setup or {}
    names = list(fns)
    if warmup:
        for name in names:
            setup.get(name, lambda: None)()
            fns[name]()
    release_free_memory()
    before = proc_status()["VmRSS"]
    times = {n: [] for n in names}
    peaks, gpu_peaks = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    gpu_before = gpu_allocated()
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            setup.get(name, lambda: None)()
            release_free_memory()
            reset_peak()
            gpu_reset()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
            peaks[name] = max(peaks[name], proc_status()["VmHWM"])
            gpu_peaks[name] = max(gpu_peaks[name], gpu_peak())
    return {
        n: {
            "time_s": statistics.median(times[n]),
            "times_s": times[n],
            "rss_before": before,
            "peak_rss": peaks[n],
            "peak_over_before": peaks[n] - before,
            **held,
            "gpu_before": gpu_before,
            "gpu_peak": gpu_peaks[n],
            "activation_bytes": gpu_peaks[n] - held["gpu_model"] if on_gpu() else peaks[n] - held["rss_model"],
        }
        for n in names
    }


def gib(n: float) -> str:
    """Bytes as GiB, or as MiB below 1 GiB."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def peak_bytes(m: dict) -> int:
    """A step's total peak: the GPU's where it ran on one, else its RSS."""
    return m["gpu_peak"] if m.get("gpu_peak") else m["peak_rss"]


def activation_bytes(m: dict) -> int | None:
    """A step's peak over the model (its activation memory), or None where it was not measured."""
    return m.get("activation_bytes")


def memory_cgroup(limit: int) -> Path | None:
    """A fresh cgroup-v1 memory group capped at `limit` bytes (swap included), or None if none can be made."""
    root = Path("/sys/fs/cgroup/memory")
    group = root / f"tracelib-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):  # only where swap accounting is on
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
    except OSError:
        with contextlib.suppress(OSError):
            group.rmdir()
        return None
    return group


def cgroup_usage(group: Path) -> dict[str, int]:
    """The group's peak usage (page cache included) and how often it hit its cap."""
    return {
        "peak_bytes": int((group / "memory.max_usage_in_bytes").read_text()),
        "failcnt": int((group / "memory.failcnt").read_text()),
    }
