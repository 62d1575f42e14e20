"""The clock of a job: wall and CPU seconds, and GPU utilisation sampled while it runs (NVML)."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Iterator


def _rusage_cpu_s() -> float:
    # Children too: a multi-GPU SFT trains in torchrun workers, not in the job's process.
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def busy_seconds(samples: list[tuple[float, list[float]]]) -> float:
    """GPU-seconds of work from (time, [utilisation % per GPU]) samples: each sample's utilisation
    holds until the next one (NVML reports the share of its last sampling period with a kernel running)."""
    busy = 0.0
    for (t0, utils), (t1, _) in zip(samples, samples[1:]):
        busy += (t1 - t0) * sum(utils) / 100.0
    return busy


def nvml_utilisation() -> list[float]:
    """Utilisation % of each visible GPU (NVML through torch; needs nvidia-ml-py)."""
    import torch

    return [float(torch.cuda.utilization(i)) for i in range(torch.cuda.device_count())]


class GpuMeter:
    """Samples GPU utilisation in a background thread while a job runs: measured GPU-seconds, beside
    the allocated GPUs x wall time that a scheduler bills. ``sample`` is injectable for tests."""

    def __init__(self, sample=nvml_utilisation, interval_s: float = 1.0):
        import threading

        self.sample, self.interval_s = sample, interval_s
        self.samples: list[tuple[float, list[float]]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-meter", daemon=True)

    def _take(self) -> bool:
        try:
            self.samples.append((time.monotonic(), list(self.sample())))
            return True
        except Exception as err:  # no NVML (driver, container): say why instead of a number
            self.error = f"{type(err).__name__}: {err}"
            return False

    def _run(self):
        while self._take() and not self._stop.wait(self.interval_s):
            pass

    def start(self) -> "GpuMeter":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        if self.error is None:
            self._take()  # close the last interval at the stop time
        if self.error is not None or len(self.samples) < 2:
            return {"gpu_busy_s": None, "gpu_busy_s_is": f"not measured ({self.error or 'too short'})"}
        per_gpu = [sum(u) / len(self.samples) for u in zip(*(utils for _, utils in self.samples))]
        return {"gpu_busy_s": round(busy_seconds(self.samples), 3),
                "gpu_busy_s_is": f"NVML utilisation x time, sampled every {self.interval_s:g} s",
                "gpu_util_mean": [round(u, 1) for u in per_gpu]}


def _cuda_available() -> bool:
    # Only where torch is already loaded or wanted: a CPU-only job need not pay its import.
    if "torch" not in sys.modules:
        return False
    import torch

    return torch.cuda.is_available()


def start_clock() -> dict:
    clock = {"t0": time.time(), "cpu0": _rusage_cpu_s()}
    if _cuda_available():
        clock["gpu_meter"] = GpuMeter().start()
    return clock


def stop_clock(clock: dict) -> dict:
    """started, ended (UTC, ISO 8601), wall_s, cpu_s and, on GPUs, the measured busy GPU-seconds."""
    wall1 = time.time()
    usage = {"started": _iso(clock["t0"]), "ended": _iso(wall1), "wall_s": round(wall1 - clock["t0"], 3),
             "cpu_s": round(_rusage_cpu_s() - clock["cpu0"], 3)}
    if "gpu_meter" in clock:
        usage.update(clock["gpu_meter"].stop())
    return usage


@contextlib.contextmanager
def measure() -> Iterator[dict]:
    """Times the block: the dict it yields gets ``stop_clock``'s keys at the end."""
    clock, usage = start_clock(), {}
    yield usage
    usage.update(stop_clock(clock))


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
