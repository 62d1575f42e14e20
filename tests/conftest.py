import os
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Nothing may be fetched from a hub: every model and dataset the tests use is made here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# The workflow runs' job servers (lamdagent/workflow/job_server.py) live in a directory of this session's
# (xdist workers inherit it) and are stopped when the session ends, rather than idling out after it.
if "LAMDAGENT_JOB_SERVER_DIR" not in os.environ:
    import tempfile

    os.environ["LAMDAGENT_JOB_SERVER_DIR"] = tempfile.mkdtemp(prefix="lamdagent-job-servers-")


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        from lamdagent.workflow.job_server import stop_servers

        stop_servers(os.environ["LAMDAGENT_JOB_SERVER_DIR"])


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first, so that with one xdist worker per core (work stealing) the long
    ones start at once and the short ones fill the gaps. Among them, modules with several slow tests
    (they share a module-scoped exploration or cluster) lead: a worker runs the head of its queue
    itself, while stealing takes from the tail, so such a module is not split over two workers that
    would each build its fixture."""
    slow_per_module = Counter(item.module.__name__ for item in items if item.get_closest_marker("slow"))

    def order(item):
        if item.get_closest_marker("slow") is None:
            return (1, 0)
        return (0, -slow_per_module[item.module.__name__])

    items.sort(key=order)  # stable: collection order within each group


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
