"""Failed actions: what counts as one, the record it leaves, and running an action under a deadline.

An action (SFT, a merge, ...) runs in a child process of its rule's job. When the action itself
fails -- a Python exception, a NaN/inf loss (``TrainingDiverged``), out of memory
(``torch.OutOfMemoryError``, ``MemoryError``) or the time limit (the job stops the child
``failures.time_margin_s`` before the rule's ``runtime`` ends) -- the job writes the model's
directory with ``failure.json`` only (kind, reason, the tail of the log; no weights, so nothing can
load it) and ends successfully: Snakemake keeps the output, a rerun does not retry the deterministic
failure, and the agent is fed the failure (``status: failed``, the configured failure score).

Everything else is infrastructure and is *not* recorded: a job or node killed from outside, so that
the job never gets to write the record (or its child is killed by a signal: the kernel's OOM killer,
``scancel``), makes the job fail; Snakemake retries it (``resources.<rule>.retries``) with more
memory and time. To retry a recorded failure, delete ``results/models/<id>/``.

``python -m lamdagent.actions.failures --call lamdagent.actions.train:sft --args-json A.json ...`` is the child's
entry point (also under torchrun, one per GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

from lamdagent.store.fileio import atomic_directory, atomic_write_json, read_json

FAILURE_FILE = "failure.json"
KINDS = ("error", "diverged", "out_of_memory", "time_limit", "input_failed")
STOP_GRACE_S = 30.0  # SIGTERM, then SIGKILL this much later
MAX_REASON_CHARS = 500


class ActionFailed(Exception):
    """The action failed for a reason of its own; ``kind`` is one of ``KINDS``."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind, self.reason = kind, reason


def classify(exc: BaseException) -> tuple[str, str]:
    """(kind, one-line reason) of an exception raised by an action."""
    from lamdagent.actions.train import TrainingDiverged

    message = " ".join(str(exc).split())
    if isinstance(exc, TrainingDiverged):
        return "diverged", _clip(message)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return "out_of_memory", _clip(f"out of memory: {message or type(exc).__name__}")
    return "error", _clip(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def deadline_s(runtime_min: Any, margin_s: float) -> float | None:
    """Seconds an action may run: the rule's ``runtime`` (minutes) less the margin the job needs to
    record a failure; None without a runtime. A margin that would leave nothing keeps half the runtime."""
    if runtime_min in (None, ""):
        return None
    total = float(runtime_min) * 60.0
    return total - margin_s if total - margin_s > 0 else total / 2


def log_tail(path: str | os.PathLike, lines: int) -> str:
    """The last ``lines`` lines of a log file ("" if it is missing)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip("\n")
    except FileNotFoundError:
        return ""


def read_failure(model_dir: str | os.PathLike) -> dict | None:
    """The failure record of a model directory, or None for a built (or not yet built) model."""
    path = Path(model_dir) / FAILURE_FILE
    return read_json(path) if path.is_file() else None


def write_failure(out_dir: str | os.PathLike, record: dict) -> None:
    """``out_dir`` becomes a directory holding only ``failure.json`` (atomically: complete or absent)."""
    with atomic_directory(out_dir) as scratch:
        atomic_write_json(scratch / FAILURE_FILE, record)


def failure_record(*, model: str, action: str, kind: str, reason: str, log_path, log_lines: int,
                   elapsed_s: float | None = None, deadline: float | None = None) -> dict:
    if kind not in KINDS:
        raise ValueError(f"unknown failure kind {kind!r}; known: {', '.join(KINDS)}")
    return {"model": model, "action": action, "status": "failed", "kind": kind, "reason": reason,
            "elapsed_s": None if elapsed_s is None else round(elapsed_s, 3), "deadline_s": deadline,
            "log": str(log_path), "log_tail": log_tail(log_path, log_lines),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---- the child process and its deadline -------------------------------------------------------


def child_command(call: str, args_json, metrics_json, failure_json, *, threads: int | None = None) -> list[str]:
    """The arguments after ``python -m lamdagent.actions.failures`` (or after torchrun's ``-m``)."""
    args = ["--call", call, "--args-json", str(args_json), "--metrics-json", str(metrics_json),
            "--failure-json", str(failure_json)]
    return args + (["--threads", str(threads)] if threads else [])


def _die_with_parent():
    """Linux: a function for ``preexec_fn`` that makes the child get SIGKILL when the job process dies
    (a kill -9 of the run leaves no orphan training). libc is loaded here, in the parent: a forked
    child of a threaded process must not dlopen."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the child's process group (torchrun and its workers), SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def remove_partial(out_dir: str | os.PathLike) -> None:
    """Scratch directories a killed child left beside ``out_dir`` (see ``fileio.atomic_directory``)."""
    out_dir = Path(out_dir)
    for scratch in out_dir.parent.glob(f".{out_dir.name}.*.partial"):
        shutil.rmtree(scratch, ignore_errors=True)


def run_action(command: list[str], *, metrics_json, failure_json, deadline: float | None, out_dir,
               env: dict | None = None, config: dict | None = None, resources: Any = None) -> dict:
    """Run an action's child ``command`` and return its metrics.

    A ``python -m lamdagent.actions.failures ...`` command runs as a child of the job server when
    ``config`` enables it (``lamdagent.actions.job_server``: torch and trl already imported), else as
    a process of its own. Raises ``ActionFailed`` when the action failed (its own record, or the
    deadline), RuntimeError when the child was killed by a signal from outside (infrastructure: the
    job fails and is retried).
    """
    from lamdagent.actions import job_server

    for path in (metrics_json, failure_json):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    started = time.monotonic()
    process = None
    if command[1:3] == ["-m", __name__]:
        process = job_server.spawn(main, command[3:], config=config, resources=resources, env=env)
    if process is None:
        process = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent())
    try:
        returncode = process.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        _stop(process)
        remove_partial(out_dir)
        raise ActionFailed("time_limit", f"time limit: stopped after {time.monotonic() - started:.0f} s "
                                         f"(the rule's runtime less failures.time_margin_s)") from None
    except BaseException:  # Ctrl-C or an error in this process: the child must not outlive the job
        _stop(process)
        remove_partial(out_dir)
        raise
    if returncode == 0:
        return read_json(metrics_json)
    remove_partial(out_dir)
    if Path(failure_json).is_file():
        failure = read_json(failure_json)
        raise ActionFailed(failure["kind"], failure["reason"])
    if returncode < 0:
        raise RuntimeError(f"the action's process was killed by {signal.Signals(-returncode).name} "
                           "(from outside: out-of-memory killer, scancel, ...); Snakemake retries the job")
    raise ActionFailed("error", f"the action's process exited with code {returncode} without a result")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _resolve(call: str):
    module, _, name = call.partition(":")
    if not module.startswith("lamdagent.") or not name.isidentifier():
        raise SystemExit(f"--call must be lamdagent.<module>:<function>, got {call!r}")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lamdagent.actions.failures",
                                     description="Run one action; record how it failed, if it does.")
    parser.add_argument("--call", required=True, help="lamdagent.<module>:<function>")
    parser.add_argument("--args-json", required=True, help="JSON object of the function's keyword arguments")
    parser.add_argument("--metrics-json", required=True, help="where the main process writes the returned metrics")
    parser.add_argument("--failure-json", required=True, help="where a failing process writes kind and reason")
    parser.add_argument("--threads", type=int, help="torch's CPU threads")
    ns = parser.parse_args(argv)
    # SIGTERM (the deadline) unwinds like an exception, so atomic writes clean their scratch up.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    function = _resolve(ns.call)
    kwargs = json.loads(Path(ns.args_json).read_text(encoding="utf-8"))
    if ns.threads:
        import torch

        torch.set_num_threads(ns.threads)
    started = time.time()
    try:
        metrics = function(**kwargs)
    except Exception as exc:  # noqa: BLE001 - every exception of the action is its failure, recorded
        traceback.print_exc()
        kind, reason = classify(exc)
        atomic_write_json(ns.failure_json, {"kind": kind, "reason": reason})
        print(f"[lamdagent] action failed ({kind}): {reason}", file=sys.stderr, flush=True)
        return 3
    metrics["wall_s"] = time.time() - started
    # The machine as the action saw it (torch's threads and device): the job's own process never imports torch.
    from lamdagent.actions.launch import hardware

    metrics["hardware"] = hardware()
    if _is_main_process():
        atomic_write_json(ns.metrics_json, metrics)
    _destroy_process_group()
    return 0


def _destroy_process_group() -> None:
    # torchrun workers otherwise warn (or hang on some NCCL versions) at exit.
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
