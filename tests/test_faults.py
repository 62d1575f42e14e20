"""Agent and API faults against the real `transformers serve` of the tiny model.

A small HTTP proxy of our own sits between the openai client and the server and answers the first
requests with the faults a real API shows (429, 5xx, a reply slower than the client's time-out, a
dropped connection); the server itself is also stopped and restarted. The lock test runs the real
workflow twice on one directory.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time

import e2e
import openai
import pytest
from conftest import ServedModel
from e2e import run_snakemake, snakemake_command, write_tiny_config
from test_agent import config as agent_config
from test_agent import pool, specialist
from test_workflow import check_plan_agrees_with_results

from lamdagent.actions.registry import enumerate_actions
from lamdagent.agent.controller import Backoff, ControllerRejected, ControllerUnavailable, OpenAIController
from lamdagent.agent.fallbacks import FallbackRateExceeded, check_fallback_rate
from lamdagent.agent.objects import recipe_for
from lamdagent.agent.propose import CallLog, propose
from lamdagent.store.recipes import RecipeStore, model_id

KEY_ENV = "LAMDAGENT_FAULTS_KEY"
FAST = {"initial_s": 0.01, "max_s": 0.05, "multiplier": 2.0}  # real backoff, tiny waits
TIMEOUT_S = 5.0  # the client's time-out; a tiny-model reply takes ~0.3 s, leave room for a loaded machine


class FaultProxy:
    """Forwards HTTP requests to ``upstream``, but answers the first ones with the scripted faults.

    Faults: an HTTP status ("429", "500", ...), a status with the error body a real API sends
    (``("400", {"message": ..., "param": ...})``), "delay" (no reply until past the client's time-out,
    then the connection closes) and "drop" (the connection is reset before any reply).
    """

    def __init__(self, upstream_port: int, delay_s: float):
        self.upstream_port, self.delay_s = upstream_port, delay_s
        self.faults: list = []
        self.seen: list[str] = []  # what each request got: a fault's status or "forwarded"
        self.requests: list[dict] = []  # the JSON body of each request, as the client sent it
        self.lock = threading.Lock()
        self.released = threading.Event()  # ends pending delays at teardown
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                self.handle_one()

            def do_POST(self):
                self.handle_one()

            def handle_one(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    fault = proxy.faults.pop(0) if proxy.faults else "forwarded"
                    fault, error = fault if isinstance(fault, tuple) else (fault, None)
                    proxy.seen.append(fault)
                    proxy.requests.append(json.loads(body) if body else {})
                if fault == "forwarded":
                    self.forward(body)
                elif fault == "delay":
                    proxy.released.wait(proxy.delay_s)
                    self.close_connection = True
                elif fault == "drop":
                    # SO_LINGER 0: close sends a RST, as a crashed server or a balancer would.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                else:
                    status, _, message = fault.partition(":")  # "400:why" carries the server's message
                    error = error or {"message": message or f"injected {fault}", "type": "injected"}
                    payload = json.dumps({"error": error}).encode()
                    self.send_response(int(status))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            def forward(self, body: bytes):
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                upstream.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def inject(self, *faults) -> None:
        with self.lock:
            self.faults = list(faults)
            self.seen = []
            self.requests = []

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """One server start for the module (seconds); the restart test leaves it running again."""
    server = ServedModel(tiny_model_dir, tmp_path_factory.mktemp("serve")).start()
    # The first request loads the model; done here, it cannot count as a time-out in a test.
    openai.OpenAI(api_key="warm-up", base_url=server.url, max_retries=3, timeout=120).chat.completions.create(
        model=str(tiny_model_dir), messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(served):
    with FaultProxy(served.port, delay_s=TIMEOUT_S + 2) as fault_proxy:
        yield fault_proxy


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-faults-test")


def controller(url: str, model_dir, model: str | None = None, temperature: float | None = 0.0,
               **backoff) -> OpenAIController:
    return OpenAIController(model=model or str(model_dir), api_key_env=KEY_ENV, base_url=url, timeout_s=TIMEOUT_S,
                            temperature=temperature, backoff={**FAST, **backoff}, seed=0)


def propose_with(llm, tmp_path, iteration: int = 1) -> tuple[dict, CallLog]:
    """The agent's real selection step (test_agent's pool) with ``llm`` as the controller."""
    config = agent_config()
    config["controller"]["type"] = "openai"
    store = RecipeStore(tmp_path)
    specialist(store)
    log = CallLog()
    record = propose(iteration=iteration, config=config, pool=pool(), history=[], memory="No results yet.",
                     controller=llm, store=store, log=log)
    # A valid action: the recipe of one of the enumerated combinations, saved for the workflow.
    space = enumerate_actions(config["action_types"], pool().candidates)
    assert any(model_id(recipe_for(config, pool().datasets, record["action"], combo)) == record["model"]
               for combo in space.get(record["action"], []))
    assert (tmp_path / f"{record['model']}.json").is_file()
    # The fallback flag is set exactly when no reply of that kind could be used.
    for kind, flag in record["fallback"].items():
        calls = [c for c in log.calls if c["kind"] == kind]
        assert flag == all(c["parsed"] is None for c in calls), (kind, calls)
    return record, log


def test_backoff_schedule_is_exponential_capped_jittered_and_seeded():
    backoff = Backoff(attempts=6, initial_s=1.0, max_s=5.0, multiplier=2.0)
    planned = [1.0, 2.0, 4.0, 5.0, 5.0]
    rng = random.Random(0)
    delays = [backoff.delay(retry, rng) for retry in range(1, 6)]
    assert all(p / 2 <= d <= p for d, p in zip(delays, planned)), delays
    again = random.Random(0)
    assert [backoff.delay(retry, again) for retry in range(1, 6)] == delays
    assert backoff.delay(1, rng, retry_after=3.0) >= 3.0  # the server's Retry-After is honoured...
    assert backoff.delay(1, rng, retry_after=600.0) == 5.0  # ...up to max_s


def test_transient_faults_are_retried_until_the_real_reply(proxy, tiny_model_dir):
    proxy.inject("429", "500", "503", "delay", "drop")
    llm = controller(proxy.url, tiny_model_dir, attempts=6)
    completion = llm.complete("Pick 1 or 2.", max_tokens=8, stop=["\n"])
    assert proxy.seen == ["429", "500", "503", "delay", "drop", "forwarded"]
    assert completion.attempts == 6
    assert [e.split(":")[0] for e in completion.errors] == [
        "RateLimitError", "InternalServerError", "InternalServerError", "APITimeoutError", "APIConnectionError"]
    assert completion.tokens_in > 0  # the real server answered
    assert completion.latency_s >= TIMEOUT_S  # the time-out is part of what the agent waited


def test_the_last_failed_attempt_raises_a_clear_error(proxy, tiny_model_dir):
    proxy.inject("503", "429", "503", "503")
    with pytest.raises(ControllerUnavailable) as failure:
        controller(proxy.url, tiny_model_dir, attempts=3).complete("x", max_tokens=4)
    assert proxy.seen == ["503", "429", "503"]  # exactly `attempts` requests, no hidden client retries
    assert failure.value.attempts == 3 and len(failure.value.errors) == 3
    assert str(failure.value).startswith("no reply after 3 attempt(s); last error: InternalServerError")


def test_other_client_errors_are_not_retried(proxy, tiny_model_dir):
    proxy.inject("400", "400")
    with pytest.raises(ControllerRejected) as refused:
        controller(proxy.url, tiny_model_dir, attempts=5).complete("x", max_tokens=4)
    assert proxy.seen == ["400"]
    assert "(HTTP 400): BadRequestError: injected 400" in str(refused.value)


def test_a_wrong_model_name_fails_the_step_with_the_servers_message(proxy, tiny_model_dir, tmp_path):
    proxy.inject()
    llm = controller(proxy.url, tiny_model_dir, model="no-such-model", attempts=5)
    log = CallLog()
    with pytest.raises(ControllerRejected) as refused:
        propose(iteration=1, config=dict(agent_config(), controller={**agent_config()["controller"], "type": "openai"}),
                pool=pool(), history=[], memory="No results yet.", controller=llm, store=RecipeStore(tmp_path),
                log=log)
    message = str(refused.value)
    assert proxy.seen == ["forwarded"]  # the real server answered, once: no retry, no fallback
    # transformers serve's own words (a FastAPI `detail`, which the openai client leaves out of its text).
    assert "refused the request for model 'no-such-model' (HTTP 400)" in message
    assert f"Server is pinned to '{tiny_model_dir}'; requested 'no-such-model'" in message
    assert os.environ[KEY_ENV] not in message and not list(tmp_path.glob("*.json"))  # no recipe proposed


def test_a_refused_key_is_named_by_its_variable_and_never_echoed(proxy, tiny_model_dir):
    # OpenAI's 401 quotes the key it was given; the message shown must not.
    key = os.environ[KEY_ENV]
    proxy.inject(("401", {"message": f"Incorrect API key provided: {key}. You can find your API key at "
                                     "https://platform.openai.com/account/api-keys.", "type": "invalid_request_error",
                          "param": None, "code": "invalid_api_key"}))
    with pytest.raises(ControllerRejected) as refused:
        controller(proxy.url, tiny_model_dir, attempts=5).complete("x", max_tokens=4)
    message = str(refused.value)
    assert proxy.seen == ["401"] and key not in message and "Incorrect API key provided: <redacted>." in message
    assert "AuthenticationError" in message and "controller.api_key_env" in message


def test_a_reasoning_models_400_on_max_tokens_switches_to_max_completion_tokens(proxy, tiny_model_dir):
    # OpenAI's reply to max_tokens for o1/o3/gpt-5 models.
    proxy.inject(("400", {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                                     "'max_completion_tokens' instead.", "type": "invalid_request_error",
                          "param": "max_tokens", "code": "unsupported_parameter"}))
    llm = controller(proxy.url, tiny_model_dir, attempts=1)
    completion = llm.complete("Pick 1 or 2.", max_tokens=3)
    assert proxy.seen == ["400", "forwarded"] and completion.attempts == 1 and 0 < completion.tokens_out <= 3
    assert proxy.requests[0]["max_tokens"] == 3 and "max_completion_tokens" not in proxy.requests[0]
    assert proxy.requests[1]["max_completion_tokens"] == 3 and "max_tokens" not in proxy.requests[1]
    proxy.inject()
    llm.complete("Pick 1 or 2.", max_tokens=3)  # the next call asks the right way at once
    assert proxy.seen == ["forwarded"] and proxy.requests[0]["max_completion_tokens"] == 3


def test_a_rejected_temperature_is_named_with_the_config_that_drops_it(proxy, tiny_model_dir):
    proxy.inject(("400", {"message": "Unsupported value: 'temperature' does not support 0.0 with this model. Only the "
                                     "default (1) value is supported.", "type": "invalid_request_error",
                          "param": "temperature", "code": "unsupported_value"}))
    with pytest.raises(ControllerRejected) as refused:
        controller(proxy.url, tiny_model_dir, attempts=3).complete("x", max_tokens=4)
    assert proxy.seen == ["400"] and "set controller.temperature: null to send none" in str(refused.value)
    # temperature: null and stop: [] send neither; the server answers.
    proxy.inject()
    completion = controller(proxy.url, tiny_model_dir, temperature=None, attempts=1).complete("x", max_tokens=4,
                                                                                              stop=[])
    assert completion.tokens_in > 0 and not {"temperature", "stop"} & set(proxy.requests[0])


def test_a_run_that_mostly_falls_back_stops_with_the_reason(proxy, tiny_model_dir, tmp_path):
    config = agent_config()
    config["controller"].update(type="openai", max_fallback_rate=0.5, fallback_rate_after=4)
    entries = []
    for iteration in (1, 2):
        # One attempt per call, two asks per question: every call of the step gets a 503.
        proxy.inject("503", "503", "503", "503")
        record, log = propose_with(controller(proxy.url, tiny_model_dir, attempts=1), tmp_path, iteration)
        assert record["fallback"] == {"type_selection": True, "object_selection": True}
        assert record["calls"]["questions"] == 2 and record["calls"]["fallbacks"] == 2
        entries.append(record)
        if iteration == 1:  # 2 questions: too few to judge
            assert check_fallback_rate(config, entries, log.calls) == (2, 2)
    with pytest.raises(FallbackRateExceeded) as stopped:
        check_fallback_rate(config, entries, log.calls)
    message = str(stopped.value)
    assert "4 of the run's 4 questions to the controller (100%) fell back" in message
    assert "controller.max_fallback_rate (50%)" in message and "InternalServerError: injected 503" in message
    config["controller"]["max_fallback_rate"] = 1.0  # the check off
    assert check_fallback_rate(config, entries, log.calls) == (4, 4)
    # Answered questions dilute the rate: the same two steps and two answered memory rewrites.
    config["controller"]["max_fallback_rate"] = 0.5
    remembered = [dict(entry, fallback={**entry["fallback"], "memory_update": False}) for entry in entries]
    with pytest.raises(FallbackRateExceeded):
        check_fallback_rate(config, remembered, log.calls)  # 4 of 6
    answered = remembered + [dict(remembered[0], iteration=3, calls={"questions": 2, "fallbacks": 0})]
    assert check_fallback_rate(config, answered, log.calls) == (9, 4)  # 4 of 9: below one half


def test_more_faults_than_attempts_give_a_counted_fallback_and_a_valid_proposal(proxy, tiny_model_dir, tmp_path):
    # 2 attempts per call, the agent asks twice (retries: 1): four 503s exhaust the type selection.
    proxy.inject("503", "429", "503", "503")
    record, log = propose_with(controller(proxy.url, tiny_model_dir, attempts=2), tmp_path)
    assert proxy.seen[:4] == ["503", "429", "503", "503"] and set(proxy.seen[4:]) == {"forwarded"}
    assert record["fallback"]["type_selection"] is True
    failed = [c for c in log.calls if c["kind"] == "type_selection"]
    assert len(failed) == 2
    assert all(c["error"].startswith("ControllerUnavailable: no reply after 2 attempt(s)") for c in failed)
    assert "InternalServerError" in failed[-1]["error"]
    # The object selection then reached the real server: its calls carry real replies, no errors.
    answered = [c for c in log.calls if c["kind"] == "object_selection"]
    assert answered and all(c["error"] is None and c["tokens_in"] > 0 for c in answered)


def test_server_stopped_then_restarted_on_the_same_port(served, tiny_model_dir, tmp_path):
    try:
        served.stop()
        record, log = propose_with(controller(served.url, tiny_model_dir, attempts=3), tmp_path)
        assert record["fallback"] == {"type_selection": True, "object_selection": True}
        assert len(log.calls) == 4  # two asks per kind, each of three refused attempts
        assert all(c["error"].startswith("ControllerUnavailable: no reply after 3 attempt(s); last error: "
                                         "APIConnectionError") for c in log.calls)

        # Restarted while a call is backing off: the call bridges the outage, no fallback needed.
        restart = threading.Thread(target=served.start)
        patient = controller(served.url, tiny_model_dir, attempts=30, initial_s=0.25, max_s=2.0)
        restart.start()
        completion = patient.complete("Pick 1 or 2.", max_tokens=8, stop=["\n"])
        restart.join()
        assert completion.attempts > 1 and completion.tokens_in > 0
        # Refused while the server starts; a time-out if the first request, which loads the model, is slow.
        assert all(e.startswith(("APIConnectionError", "APITimeoutError")) for e in completion.errors)

        # And the next call is plain again.
        assert controller(served.url, tiny_model_dir, attempts=1).complete("hi", max_tokens=4).attempts == 1
    finally:
        if served.process is None:
            served.start()


@pytest.mark.slow
def test_a_second_snakemake_on_the_same_directory_is_refused(tmp_path, tiny_model_dir):
    workdir = tmp_path / "run"
    config = write_tiny_config(workdir, tiny_model_dir, iterations=1)
    log = open(tmp_path / "first.log", "w")  # a file, not a pipe nobody reads while the run goes on
    first = subprocess.Popen(snakemake_command(workdir, config), cwd=workdir, env=e2e.subprocess_env(),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        locks = workdir / ".snakemake" / "locks"
        deadline = time.monotonic() + 300
        while not (locks.is_dir() and any(locks.iterdir())) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert first.poll() is None, "the first run ended before the second could start"

        second = run_snakemake(workdir, config, check=False, timeout=300)
        assert first.poll() is None, "the first run ended while the second ran: the lock was not tested"
        assert second.returncode != 0
        assert "Directory cannot be locked" in second.stdout, second.stdout[-4000:]

        first.wait(timeout=900)
    except BaseException:
        os.killpg(first.pid, signal.SIGKILL)
        raise
    finally:
        log.close()
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-8000:]

    plan = check_plan_agrees_with_results(workdir, 1, {"tiny"})
    board = (workdir / "results" / "leaderboard.tsv").read_text().splitlines()
    assert len(board) == 1 + len({e["model"] for e in plan["initial"] + plan["steps"]})
    # Nothing is left half-done or locked: the same command now has nothing to do.
    again = run_snakemake(workdir, config, "--dry-run", timeout=300)
    assert "Nothing to be done" in again.stdout, again.stdout[-4000:]
