"""The job server: jobs of a local run fork from one process that has imported torch & co. once.

Over 400 lines: the job's end and the server's end of one protocol, kept in one module so that what
one sends and the other reads (and the process semantics both keep) are read side by side.

A job of this workflow is a fresh Python process (Snakemake's ``script:``), and an action's job starts
one more (``lamdagent.actions.failures``). Importing torch, transformers, trl, lm-eval and mergekit
costs 4-9 s of CPU per process, more than a tiny model's whole job. With ``job_server.enabled`` (config),
the first job of a local run starts a server that imports them once; every later job sends it its
function, arguments, working directory, environment and standard streams over a Unix socket, and the
server forks a child that runs it. The job's process waits and exits with the child's code, so
Snakemake sees the job as before: its log, its exit status, its wall time.

Semantics kept from one process per job:
- the child runs in the job's cwd, environment, ``sys.path`` and umask, writing to the job's stdout and
  stderr (passed as file descriptors); it exits the way a Python process does (threads joined,
  atexit functions run), less the teardown of the modules it shares with the server;
- a job killed in any way (SIGKILL of the run included) closes its socket, and the server SIGKILLs the
  child's process group at once; SIGTERM/SIGINT/SIGHUP sent to the job are passed on to the child;
- CPU seconds and peak memory of the child (and of the nested children it asked the server for) come
  back to the job, which writes them beside Snakemake's benchmark file (``<benchmark>.server.json``,
  read by ``lamdagent.report.costs``), since Snakemake measures only the job's own process tree.

Not used (the job runs in its own process): job_server.enabled false, outside Linux, inside a SLURM
job (each cluster job is one rule job, there is nothing to share), when no server is ready yet (the
job starts one and runs by itself), and for a job that asks for GPUs if the server's imports loaded
the CUDA driver (a forked child cannot use CUDA that its parent initialised; importing torch does
not). One server serves one interpreter, one copy of this package (by its files' stamps) and one
environment (the variables libraries read at import): a job that matches none starts its own. The
socket lives in a directory only the user can read; the server checks the peer's uid; it exits after
``job_server.idle_s`` seconds without a job.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import importlib
import json
import os
import pickle
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEFAULT_IDLE_S = 60.0
# What a job imports that costs seconds: imported once by the server (a missing one is skipped).
PRELOAD = (
    "torch", "transformers", "transformers.models.llama.modeling_llama", "datasets", "pandas", "peft",
    "trl", "lm_eval.evaluator", "lm_eval.tasks", "lm_eval.models.huggingface", "mergekit.merge",
    "snakemake.script",
)
# Environment variables that libraries read when they are imported: a server serves jobs whose values match its own.
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "CUDA", "NCCL", "OMP_", "MKL_",
                   "OPENBLAS", "TOKENIZERS", "WANDB", "PYTHON", "LD_", "ACCELERATE", "TRL_", "DATASETS", "LAMDAGENT")
# Snakemake sets these to each job's threads; the child applies them to torch as torch's import would.
PER_JOB_ENV_SUFFIX = "_NUM_THREADS"
_HEADER = struct.Struct("!Q")
_JOB_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_PRCTL = None
_STREAMS = (0, 1, 2)


# ---- where the server is, and whether a job may use it ----------------------------------------


def enabled(config: dict | None) -> bool:
    """Whether a job with this config may use the server (local runs on Linux; never inside a SLURM job)."""
    settings = (config or {}).get("job_server") or {}
    return bool(settings.get("enabled", False)) and sys.platform == "linux" and "SLURM_JOB_ID" not in os.environ


def cuda_driver_loaded() -> bool:
    """Whether this process has loaded the CUDA driver (libcuda), i.e. something initialised CUDA: a
    child forked from it then cannot use the GPU, so the server sends GPU jobs back to run by themselves."""
    with contextlib.suppress(OSError):
        return "/libcuda.so" in Path("/proc/self/maps").read_text()
    return False


def runtime_dir() -> Path:
    """A directory only this user can enter: the socket there accepts only what the user can run anyway."""
    base = os.environ.get("LAMDAGENT_JOB_SERVER_DIR") or os.path.join(
        os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(), f"lamdagent-{os.getuid()}")
    path = Path(base)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path}: the job server's directory must be the user's own, mode 0700")
    return path


def fingerprint() -> str:
    """Which server a job may use: this interpreter, this package's files, installed packages, import-time env."""
    package = Path(__file__).resolve().parents[1]
    parts = [sys.executable, sys.version, str(package)]
    for path in sorted(package.rglob("*.py")):
        info = path.stat()
        parts.append(f"{path.relative_to(package)}:{info.st_mtime_ns}:{info.st_size}")
    for entry in sys.path:  # an install or upgrade changes its site-packages directory
        if entry.endswith(("site-packages", "dist-packages")):
            with contextlib.suppress(OSError):
                parts.append(f"{entry}:{os.stat(entry).st_mtime_ns}")
    parts += sorted(f"{k}={v}" for k, v in os.environ.items()
                    if k.startswith(IMPORT_TIME_ENV) and not k.endswith(PER_JOB_ENV_SUFFIX))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _paths(key: str) -> tuple[Path, Path, Path]:
    directory = runtime_dir()
    return directory / f"{key}.sock", directory / f"{key}.lock", directory / f"{key}.log"


# ---- the job's side -------------------------------------------------------------------------------


def run(function: Callable, smk) -> None:
    """Run a rule's ``function(smk)``: in a child of the job server when one is ready, else in this process."""
    sidecar = _server_usage_path(smk)
    if sidecar is not None:
        with contextlib.suppress(FileNotFoundError):
            sidecar.unlink()
    child = spawn(function, smk, config=getattr(smk, "config", None), resources=getattr(smk, "resources", None))
    if child is None:
        function(smk)
        return
    with _forwarding_signals(child.pid):
        returncode = child.wait()
    if sidecar is not None and child.usage:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        sidecar.write_text(json.dumps(child.usage) + "\n", encoding="utf-8")
    if returncode != 0:
        # The child printed its traceback to this job's stderr already.
        sys.exit(returncode if returncode > 0 else 128 - returncode)


def _server_usage_path(smk) -> Path | None:
    """``results/benchmarks/<x>.tsv.server.json`` for the job logging to ``results/logs/<x>.log`` (the rules
    keep the two paths parallel; tests/test_job_server.py checks every rule)."""
    log = Path(smk.log[0]) if getattr(smk, "log", None) else None
    if log is None or "logs" not in log.parts or log.suffix != ".log":
        return None
    parts = list(log.with_suffix(".tsv").parts)
    parts[parts.index("logs")] = "benchmarks"
    return Path(*parts).with_name(parts[-1] + ".server.json")


@dataclass
class Child:
    """A job's function running in a child of the server: ``subprocess.Popen``'s ``pid``/``wait``/``returncode``."""

    pid: int
    sock: socket.socket
    returncode: int | None = None
    usage: dict = field(default_factory=dict)
    received: bytes = b""  # the server's reply so far (it may have come with the pid)

    def poll(self) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.wait(timeout=0)
        return None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        self.sock.settimeout(timeout)
        try:
            while not self.received.endswith(b"\n"):
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise EOFError
                self.received += chunk
            reply = json.loads(self.received)
        except (socket.timeout, BlockingIOError):
            raise subprocess.TimeoutExpired(f"job server child {self.pid}", timeout) from None
        except (ConnectionError, EOFError):  # the server went away: its children went with it
            reply = {"returncode": -signal.SIGKILL}
        self.returncode = int(reply["returncode"])
        self.usage = {k: reply[k] for k in ("cpu_s", "max_rss_mb") if k in reply}
        self.sock.close()
        return self.returncode


def spawn(function: Callable, *args: Any, config: dict | None = None, resources: Any = None,
          env: dict | None = None) -> Child | None:
    """``function(*args)`` in a forked child of the job server, or None when there is no server to use
    (the caller runs it itself). The child is a process group of its own (``os.killpg(child.pid, ...)``)."""
    if not enabled(config):
        return None
    try:
        key = fingerprint()
        sock_path, lock_path, log_path = _paths(key)
    except OSError as exc:
        print(f"[lamdagent] job server not used: {exc}", file=sys.stderr, flush=True)
        return None
    try:
        # The call is unpickled by the child, once it has the job's sys.path: the server imports no job code.
        from lamdagent.actions.launch import gpu_count

        request = {"call": pickle.dumps((function, args)), "gpus": gpu_count(resources), "cwd": os.getcwd(),
                   "env": dict(os.environ if env is None else env), "sys_path": list(sys.path),
                   "argv": list(sys.argv), "umask": _umask()}
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        print(f"[lamdagent] job server not used: {exc}", file=sys.stderr, flush=True)
        return None
    payload = pickle.dumps(request)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(sock_path))
    except OSError:
        sock.close()
        _start_server(key, lock_path, log_path, idle_s=float(((config or {}).get("job_server") or {}).get(
            "idle_s", DEFAULT_IDLE_S)))
        return None
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        socket.send_fds(sock, [_HEADER.pack(len(payload))], list(_STREAMS))
        sock.sendall(payload)
        reply, rest = _receive_line(sock)
    except (OSError, EOFError) as exc:
        sock.close()
        print(f"[lamdagent] job server not used: {exc}", file=sys.stderr, flush=True)
        return None
    if "refused" in reply:
        sock.close()
        print(f"[lamdagent] job server not used: {reply['refused']}", file=sys.stderr, flush=True)
        return None
    return Child(pid=int(reply["pid"]), sock=sock, received=rest)


def stop_servers(directory: str | os.PathLike | None = None, *, wait_s: float = 30.0) -> list[int]:
    """SIGTERM every server listening in ``directory`` (default: this user's) and wait up to ``wait_s``
    for them to exit (a server kills its running children); returns their pids."""
    stopped = []
    for sock_path in sorted(Path(directory or runtime_dir()).glob("*.sock")):
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(sock_path))
            pid, _ = _peer(sock)
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
    deadline = time.monotonic() + wait_s
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.05)
    return stopped


def _peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected Unix socket (Linux SO_PEERCRED)."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _forwarding_signals(pid: int):
    """SIGTERM/SIGINT/SIGHUP to the job go to its child (Snakemake stops a job that way)."""
    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in _JOB_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_server(key: str, lock_path: Path, log_path: Path, *, idle_s: float) -> None:
    """Start a server for ``key`` in the background, unless one is starting (it holds the lock)."""
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        fcntl.flock(lock, fcntl.LOCK_UN)
    package_parent = str(Path(__file__).resolve().parents[2])
    code = (f"import sys; sys.path.insert(0, {package_parent!r}); "
            f"from lamdagent.actions.job_server import main; main({key!r}, {idle_s!r})")
    with open(log_path, "ab") as log:
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         cwd="/", start_new_session=True, close_fds=True)


def _receive_line(sock: socket.socket) -> tuple[dict, bytes]:
    """The server's first message, and what came after it (a fast child's exit status may follow at once)."""
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("the job server closed the connection")
        data += chunk
    line, _, rest = data.partition(b"\n")
    return json.loads(line), rest


def _send_json(sock: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(json.dumps(message).encode() + b"\n")


# ---- the server's side ----------------------------------------------------------------------------


@dataclass
class _Job:
    conn: socket.socket
    client_pid: int
    nested: dict = field(default_factory=lambda: {"cpu_s": 0.0, "max_rss_mb": 0.0})


@dataclass
class _Request:
    """What a forked child runs (returned by ``serve`` in the child only)."""

    call: bytes  # pickled (function, args)
    fds: list[int]
    cwd: str
    env: dict
    sys_path: list
    argv: list
    umask: int


def main(key: str, idle_s: float = DEFAULT_IDLE_S, *, preload_modules: bool = True,
         cuda_touched: bool | None = None) -> None:
    request = serve(key, idle_s, preload_modules=preload_modules, cuda_touched=cuda_touched)
    if request is not None:  # a forked child: run the job, then exit as a Python process does
        _exit(_run_request(request))


def _exit(code: int) -> None:
    """End the child as a Python process ends (its threads joined, every atexit function run, streams
    flushed) less the teardown of its modules: seconds of CPU with torch & co. loaded, and seconds in
    which the job's outputs are written but Snakemake does not know it (a kill then leaves them unrecorded)."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # CPython's own exit hook: logging.shutdown, the job's registrations, ...
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def preload() -> list[str]:
    """Import what jobs use (the package's modules included); returns what could not be imported."""
    import pkgutil

    import lamdagent

    missing = []
    names = [*PRELOAD, *(m.name for m in pkgutil.walk_packages(lamdagent.__path__, "lamdagent."))]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - an optional library missing: its jobs import it themselves
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    return missing


def serve(key: str, idle_s: float, *, preload_modules: bool = True,
          cuda_touched: bool | None = None) -> _Request | None:
    """The server's loop; returns only in a forked child, with the request it is to run. ``cuda_touched``:
    whether the imports initialised CUDA (None: look, ``cuda_driver_loaded``); then GPU jobs are refused."""
    sock_path, lock_path, log_path = _paths(key)
    lock = open(lock_path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None  # another server for this key is starting or running
    global _PRCTL
    _PRCTL = _load_prctl()
    server_pid = os.getpid()
    started = time.monotonic()
    missing = preload() if preload_modules else []
    if cuda_touched is None:
        cuda_touched = cuda_driver_loaded()
    print(f"[job server {server_pid}] {key}: imported in {time.monotonic() - started:.1f} s"
          + ("; CUDA initialised by the imports: GPU jobs run by themselves" if cuda_touched else "")
          + (f"; not importable: {'; '.join(missing)}" if missing else ""), flush=True)
    gc.freeze()  # the children share the imported objects' pages instead of copying them on collection
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()  # a killed server's
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    os.chmod(sock_path, 0o600)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    jobs: dict[int, _Job] = {}
    # The child closes the server's files through their objects: a raw os.close would let the objects'
    # finalizers close the same numbers again later, by then the job's own files.
    own_files = [lock.close, listener.close, selector.close, lambda: os.close(wake_r), lambda: os.close(wake_w)]
    last_active = time.monotonic()
    try:
        while True:
            timeout = None if jobs else idle_s - (time.monotonic() - last_active)
            if timeout is not None and timeout <= 0:
                return None
            events = selector.select(timeout)
            for selected, _ in events:
                if selected.fileobj is listener:
                    request = _accept(listener, jobs, selector, own_files, cuda_touched=cuda_touched)
                    if request is not None:
                        return request  # the child
                elif selected.fileobj == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 512):
                            pass
                    _reap(jobs, selector)
                else:  # a job's connection: EOF means the job died; its child must not outlive it
                    conn = selected.fileobj
                    pid = next((p for p, job in jobs.items() if job.conn is conn), None)
                    with contextlib.suppress(OSError):
                        if conn.recv(1):
                            continue
                    selector.unregister(conn)
                    if pid is not None:
                        _kill(pid)
            if events:
                last_active = time.monotonic()
    finally:
        if os.getpid() == server_pid:
            for pid in jobs:
                _kill(pid)
            print(f"[job server {server_pid}] stopped", flush=True)
            # The log and lock of a server that stopped as planned; a crashed one leaves its log to read.
            for path in (sock_path, log_path, lock_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _kill(pid: int) -> None:
    """SIGKILL a child's process group (its own subprocesses too), and the child itself."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


def _accept(listener, jobs: dict[int, _Job], selector, own_files: list[Callable], *,
            cuda_touched: bool) -> _Request | None:
    conn, _ = listener.accept()
    try:
        conn.settimeout(10)
        client_pid, client_uid = _peer(conn)
        if client_uid != os.getuid():
            raise PermissionError(f"a process of uid {client_uid} is not this server's user")
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, len(_STREAMS))
        (length,) = _HEADER.unpack(header)
        payload = b""
        while len(payload) < length:
            chunk = conn.recv(min(1 << 20, length - len(payload)))
            if not chunk:
                raise EOFError("the job hung up")
            payload += chunk
        request = pickle.loads(payload)  # builtins only; the call inside stays bytes
        if request.pop("gpus") and cuda_touched:
            for fd in fds:
                os.close(fd)
            _send_json(conn, {"refused": "the job asks for a GPU and the server's imports initialised CUDA"})
            conn.close()
            return None
    except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
        print(f"[job server] request refused: {type(exc).__name__}: {exc}", flush=True)
        conn.close()
        return None
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # Held until the child has its own handlers: a SIGTERM for the job must not run the server's.
    signal.pthread_sigmask(signal.SIG_BLOCK, _JOB_SIGNALS)
    pid = os.fork()
    if pid == 0:
        conn.close()
        for job in jobs.values():
            job.conn.close()
        for close in own_files:
            with contextlib.suppress(OSError):
                close()
        return _Request(fds=fds, **request)
    # Its own process group from the start, set here as well as in the child: a killpg for a job that
    # died at once must not miss a child that has not run yet.
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _JOB_SIGNALS)
    for fd in fds:
        os.close(fd)
    conn.settimeout(None)
    jobs[pid] = _Job(conn=conn, client_pid=client_pid)
    selector.register(conn, selectors.EVENT_READ)
    _send_json(conn, {"pid": pid})
    return None


def _reap(jobs: dict[int, _Job], selector) -> None:
    while jobs:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        job = jobs.pop(pid, None)
        if job is None:
            continue
        cpu_s = usage.ru_utime + usage.ru_stime + job.nested["cpu_s"]
        max_rss_mb = max(usage.ru_maxrss / 1024, job.nested["max_rss_mb"])  # Linux: KiB
        # A child that asked the server for a child of its own (an action's job) is billed for it.
        parent = next((j for p, j in jobs.items() if p == job.client_pid), None)
        if parent is not None:
            parent.nested["cpu_s"] += cpu_s
            parent.nested["max_rss_mb"] = max(parent.nested["max_rss_mb"], max_rss_mb)
        _send_json(job.conn, {"returncode": os.waitstatus_to_exitcode(status), "cpu_s": round(cpu_s, 3),
                              "max_rss_mb": round(max_rss_mb, 2)})
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(job.conn)
        job.conn.close()


def _run_request(request: _Request) -> int:
    """In the forked child: become the job (its streams, directory, environment), run it, return its exit code."""
    with contextlib.suppress(OSError):  # the server may have set it already
        os.setpgid(0, 0)
    _die_with_server()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _JOB_SIGNALS)
    for target, fd in zip(_STREAMS, request.fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    os.umask(request.umask)
    sys.path[:] = request.sys_path
    sys.argv[:] = request.argv
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        function, args = pickle.loads(request.call)
        result = function(*args)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)  # sys.exit("message"), as Python prints it
        return 1
    except BaseException:  # noqa: BLE001 - as an uncaught exception ends a Python process
        traceback.print_exc()
        return 1
    return result if isinstance(result, int) else 0


def _load_prctl():
    # Loaded in the server: a forked child of a process with threads (torch's) must not dlopen.
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    return None


def _die_with_server() -> None:
    # The server killed (not by its own exit) takes its children along: no job runs unseen by anyone.
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
