"""How a model-producing action runs on N GPUs: in-process for 0 or 1, under torchrun for more.

Pure logic (no torch import, no GPU needed), so the Snakemake rules can decide how to launch an
action and the tests can check the exact command lines.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

GPU_RESOURCE_KEYS = ("gpu", "gpus")


def _resource(resources: Any, key: str) -> Any:
    # Snakemake hands rules a ``Resources`` namedlist (attribute access); tests and callers may pass a dict.
    if resources is None:
        return None
    if isinstance(resources, Mapping):
        return resources.get(key)
    return getattr(resources, key, None)


def gpu_count(resources: Any) -> int:
    """GPUs a job asked for through the Snakemake resource ``gpu`` or ``gpus`` (0 if neither is set).

    Both spellings are accepted because the SLURM executor plugin reads ``gpu`` while profiles often
    say ``gpus``; if both are given they must agree.
    """
    counts = {}
    for key in GPU_RESOURCE_KEYS:
        value = _resource(resources, key)
        if value is None or value == "":
            continue
        if isinstance(value, bool):
            raise ValueError(f"resource {key}={value!r} must be a whole number of GPUs")
        try:
            count = int(str(value).strip())
        except ValueError:
            raise ValueError(f"resource {key}={value!r} must be a whole number of GPUs") from None
        if count < 0:
            raise ValueError(f"resource {key}={value!r} must not be negative")
        counts[key] = count
    if len(set(counts.values())) > 1:
        raise ValueError(f"resources gpu and gpus disagree: {counts}")
    return next(iter(counts.values()), 0)


def distributed_command(n_gpus: int, module: str, args: list[str], *, main_port: int | None = None,
                        python: str | None = None) -> list[str] | None:
    """The command line that runs ``python -m module args...`` as one process per GPU, or None.

    None (n_gpus <= 1) means: call the action in-process, there is nothing to distribute.
    torchrun is invoked as ``python -m torch.distributed.run`` with this interpreter, so the
    workers use the same environment even where the ``torchrun`` script is not on PATH.
    ``--standalone`` picks a free rendezvous port, so concurrent jobs on one node do not collide;
    ``main_port`` pins it instead (static rendezvous on 127.0.0.1).
    """
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int):
        raise TypeError(f"n_gpus must be an int, got {n_gpus!r}")
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"not a Python module name: {module!r}")
    if n_gpus <= 1:
        return None
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if main_port is None:
        cmd += ["--standalone"]
    else:
        if not 1 <= int(main_port) <= 65535:
            raise ValueError(f"main_port must be a TCP port, got {main_port!r}")
        cmd += ["--master-addr=127.0.0.1", f"--master-port={int(main_port)}"]
    cmd += ["--nnodes=1", f"--nproc-per-node={n_gpus}", "-m", module]
    return cmd + [str(arg) for arg in args]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """CPU, torch's thread count (CPU float sums depend on it) and the GPUs torch sees."""
    info: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(), "cpu": _cpu_model(),
                            "cpu_count": os.cpu_count()}
    if "torch" in sys.modules:  # never import torch just to describe the machine
        import torch

        info["torch_threads"] = torch.get_num_threads()
        cuda = torch.cuda.is_available()
        info["torch_device"] = "cuda" if cuda else "cpu"
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
        if cuda:
            info["cuda"] = torch.version.cuda
    return info
