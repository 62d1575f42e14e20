import contextlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Nothing may be fetched from a hub: every model and dataset the tests use is made here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# The workflow runs' job servers (lamdagent/actions/job_server.py) live in a directory of this session's
# (xdist workers inherit it) and are stopped when the session ends, rather than idling out after it.
if "LAMDAGENT_JOB_SERVER_DIR" not in os.environ:
    import tempfile

    os.environ["LAMDAGENT_JOB_SERVER_DIR"] = tempfile.mkdtemp(prefix="lamdagent-job-servers-")


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        from lamdagent.actions.job_server import stop_servers

        stop_servers(os.environ["LAMDAGENT_JOB_SERVER_DIR"])
        with contextlib.suppress(OSError):  # kept where a server that crashed left its log
            os.rmdir(os.environ["LAMDAGENT_JOB_SERVER_DIR"])


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first and spread over the xdist workers.

    xdist's work stealing hands worker i the i-th contiguous slice of the collection, runs each slice
    from its head and steals from the tails. So the collection is laid out as one slice per worker,
    each opening with its share of the slow modules (dealt longest first to the least loaded slice,
    a module whole: its tests share a module-scoped exploration or cluster) and filled up with fast
    tests that stealing can even out at the end."""
    slow = [item for item in items if item.get_closest_marker("slow")]
    fast = [item for item in items if not item.get_closest_marker("slow")]
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers <= 1:
        items[:] = slow + fast
        return
    modules: dict[str, list] = {}
    for item in slow:
        modules.setdefault(item.module.__name__, []).append(item)
    slices: list[list] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for module in sorted(modules.values(), key=lambda tests: -sum(map(_expected_s, tests))):
        least = loads.index(min(loads))
        slices[least] += module
        loads[least] += sum(map(_expected_s, module))
    # The slice sizes xdist sends: len(pending) // workers left, in turn.
    remaining, sizes = len(items), []
    for left in range(workers, 0, -1):
        sizes.append(remaining // left)
        remaining -= sizes[-1]
    ordered = []
    for chunk, size in zip(slices, sizes):
        take = max(0, size - len(chunk))
        ordered += chunk + fast[:take]
        fast = fast[take:]
    items[:] = ordered + fast


def _expected_s(item) -> float:
    """A slow test's duration in ``make test`` as measured (its ``slow(seconds=...)`` marker, given where
    it is over 45 s; the others take 10-45 s)."""
    return float(item.get_closest_marker("slow").kwargs.get("seconds", 30))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (read once from the embedded GGUF; converting it takes seconds)."""
    from transformers import AutoTokenizer

    from lamdagent.actions.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A tiny randomly initialised Llama (HF directory) with SmolLM2's tokenizer."""
    from lamdagent.actions.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer_source=smollm2_tokenizer_dir)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServedModel:
    """`transformers serve` of a model on 127.0.0.1: a real OpenAI-compatible server.

    ``stop()`` and ``start()`` again keep the port, so a client sees the server go away and come back.
    """

    def __init__(self, model_dir: Path, workdir: Path, port: int | None = None):
        self.model_dir, self.workdir = model_dir, workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process = None
        (workdir / "hf-cache").mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 120) -> "ServedModel":
        import socket
        import subprocess
        import sys
        import time

        from e2e import subprocess_env

        env = dict(subprocess_env(), HF_HUB_CACHE=str(self.workdir / "hf-cache"))
        command = [str(Path(sys.executable).with_name("transformers")), "serve", str(self.model_dir),
                   "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]
        log_path = self.workdir / "serve.log"
        with open(log_path, "a") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.process.poll() is not None:
                    raise AssertionError(log_path.read_text()) from None
                time.sleep(0.5)
        self.stop()
        raise AssertionError("transformers serve did not come up")

    def stop(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def openai_server(tmp_path, tiny_model_dir):
    """The served tiny model for one test; yields its base URL."""
    server = ServedModel(tiny_model_dir, tmp_path).start()
    try:
        yield server.url
    finally:
        server.stop()
