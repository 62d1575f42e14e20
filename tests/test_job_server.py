"""The job server (lamdagent/workflow/job_server.py): a job run in a forked child behaves as its own process.

The server here imports nothing ahead (``preload_modules=False``): the semantics under test are the
fork, the streams, the exit codes, the signals and the accounting; the e2e tests run the real one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from lamdagent.report.costs import read_benchmarks
from lamdagent.actions import job_server

REPO = Path(__file__).resolve().parent.parent
ENABLED = {"job_server": {"enabled": True, "idle_s": 30}}


# ---- what the children run (imported by the child from the caller's sys.path) ----


def report(path):
    Path(path).write_text(json.dumps({"cwd": os.getcwd(), "pid": os.getpid(), "argv": sys.argv,
                                      "group_leader": os.getpgid(0) == os.getpid(),
                                      "marker": os.environ.get("JOB_SERVER_TEST_MARKER")}))
    print("hello from the child", flush=True)


def fail():
    raise ValueError("boom in the child")


def exit_with(code):
    sys.exit(code)


def sleep_then_write(path, seconds):
    time.sleep(seconds)
    Path(path).write_text("ran to the end")


def busy(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def nested_busy(seconds):
    child = job_server.spawn(busy, seconds, config=ENABLED)
    sock_path = job_server._paths(job_server.fingerprint())[0]
    assert child is not None, f"no server for the nested child ({sock_path}: exists {sock_path.exists()})"
    return child.wait()


# ---- a server of the test's own ----


@pytest.fixture
def server(request, tmp_path, monkeypatch):
    monkeypatch.setenv("LAMDAGENT_JOB_SERVER_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    key = job_server.fingerprint()
    sock_path, _, log_path = job_server._paths(key)
    cuda_touched = getattr(request, "param", False)  # as if the server's imports had initialised CUDA
    code = (f"from lamdagent.actions.job_server import main; "
            f"main({key!r}, 30.0, preload_modules=False, cuda_touched={cuda_touched!r})")
    process = subprocess.Popen([sys.executable, "-c", code], cwd="/", start_new_session=True)
    deadline = time.monotonic() + 60
    while not sock_path.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the job server did not start"
        time.sleep(0.05)
    yield process
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert not sock_path.exists() and not log_path.exists(), "a stopped server leaves its socket or log"


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_the_child_runs_in_the_callers_directory_environment_and_streams(server, tmp_path, monkeypatch, capfd):
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    child = job_server.spawn(report, "out.json", config=ENABLED, env=dict(os.environ, JOB_SERVER_TEST_MARKER="m1"))
    assert child is not None
    assert child.wait(timeout=60) == 0
    seen = json.loads((workdir / "out.json").read_text())
    assert seen["cwd"] == str(workdir)
    assert seen["marker"] == "m1"
    assert seen["pid"] == child.pid != os.getpid()
    assert seen["group_leader"], "the child must be a process group of its own (killpg stops its subprocesses)"
    assert seen["argv"] == sys.argv
    assert "hello from the child" in capfd.readouterr().out
    assert child.usage["cpu_s"] >= 0 and child.usage["max_rss_mb"] > 0


def test_exit_codes_and_tracebacks_are_a_processs(server, capfd):
    child = job_server.spawn(fail, config=ENABLED)
    assert child.wait(timeout=60) == 1
    assert "ValueError: boom in the child" in capfd.readouterr().err
    assert job_server.spawn(exit_with, 3, config=ENABLED).wait(timeout=60) == 3
    assert job_server.spawn(exit_with, 0, config=ENABLED).wait(timeout=60) == 0


def test_an_exit_status_that_arrives_with_the_pid_is_kept():
    """A child that ends at once: the server's two messages may reach the job in one read."""
    job_end, server_end = socket.socketpair()
    server_end.sendall(b'{"pid": 123}\n{"returncode": 5, "cpu_s": 0.25, "max_rss_mb": 1.5}\n')
    server_end.close()
    reply, rest = job_server._receive_line(job_end)
    child = job_server.Child(pid=reply["pid"], sock=job_end, received=rest)
    assert child.wait(timeout=5) == 5
    assert child.usage == {"cpu_s": 0.25, "max_rss_mb": 1.5}


def test_wait_times_out_like_popen_and_a_signal_to_the_group_ends_the_child(server, tmp_path):
    child = job_server.spawn(sleep_then_write, str(tmp_path / "late"), 30, config=ENABLED)
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.2)
    assert child.poll() is None
    os.killpg(child.pid, signal.SIGTERM)  # what failures.run_action does at the deadline
    assert child.wait(timeout=30) == -signal.SIGTERM
    assert not (tmp_path / "late").exists()


CLIENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from lamdagent.actions import job_server
    import test_job_server as t
    child = job_server.spawn(t.sleep_then_write, {out!r}, 20, config=t.ENABLED)
    with job_server._forwarding_signals(child.pid):
        print(child.pid, flush=True)  # ready: a signal from here on is passed on
        code = child.wait()
    sys.exit(code if code >= 0 else 128 - code)
""")


def _client(tmp_path) -> tuple[subprocess.Popen, int]:
    script = CLIENT.format(tests=str(REPO / "tests"), out=str(tmp_path / "written"))
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    return client, int(client.stdout.readline())


def test_a_job_killed_with_sigkill_takes_its_child_along(server, tmp_path):
    client, child_pid = _client(tmp_path)
    client.kill()
    client.wait()
    assert _gone(child_pid, within=10), "the child outlived its killed job"
    time.sleep(0.5)
    assert not (tmp_path / "written").exists()


def test_sigterm_to_the_job_reaches_the_child(server, tmp_path):
    client, child_pid = _client(tmp_path)
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == 128 + signal.SIGTERM
    assert _gone(child_pid, within=10)
    assert not (tmp_path / "written").exists()


def test_a_nested_childs_cpu_is_billed_to_the_job_that_asked_for_it(server, capfd):
    child = job_server.spawn(nested_busy, 0.5, config=ENABLED)
    assert child.wait(timeout=60) == 0, capfd.readouterr().err[-3000:]
    assert child.usage["cpu_s"] >= 0.5, child.usage


def test_run_writes_the_childs_usage_beside_the_benchmark_file(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    smk = Smk(config=ENABLED, log=["results/logs/evaluate/m.val.log"])
    sidecar = tmp_path / "results/benchmarks/evaluate/m.val.tsv.server.json"
    job_server.run(busy_job, smk)
    usage = json.loads(sidecar.read_text())
    assert usage["cpu_s"] >= 0.3
    # Run in the job's own process (the server off) it leaves no sidecar, and removes a stale one.
    job_server.run(busy_job, Smk(config={}, log=smk.log))
    assert not sidecar.exists()


@dataclass
class Smk:
    """The attributes of Snakemake's ``snakemake`` object that job_server.run reads."""

    config: dict
    log: list


def busy_job(smk):
    busy(0.3)


def test_without_a_server_the_job_runs_itself_and_starts_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMDAGENT_JOB_SERVER_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    sock_path, _, _ = job_server._paths(job_server.fingerprint())
    assert job_server.spawn(busy, 0, config={"job_server": {"enabled": True, "idle_s": 1}}) is None
    deadline = time.monotonic() + 120  # the real server: it imports torch & co. first
    while not sock_path.exists():
        assert time.monotonic() < deadline, "no server was started"
        time.sleep(0.2)
    deadline = time.monotonic() + 60
    while sock_path.exists():  # idle_s 1: it stops by itself
        assert time.monotonic() < deadline, "the idle server did not stop"
        time.sleep(0.2)


def test_not_used_when_off_or_inside_a_slurm_job(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMDAGENT_JOB_SERVER_DIR", str(tmp_path / "run"))
    assert job_server.spawn(busy, 0, config={"job_server": {"enabled": False}}) is None
    assert job_server.spawn(busy, 0, config={}) is None
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert job_server.spawn(busy, 0, config=ENABLED) is None
    assert not list((tmp_path / "run").glob("*.sock"))


@pytest.mark.parametrize("server", [True], indirect=True)
def test_a_gpu_job_runs_by_itself_where_the_servers_imports_initialised_cuda(server, capfd):
    assert job_server.spawn(exit_with, 0, config=ENABLED, resources={"gpu": 1}) is None
    assert "initialised CUDA" in capfd.readouterr().err
    assert job_server.spawn(exit_with, 0, config=ENABLED, resources={"gpu": 0}).wait(timeout=60) == 0


def test_a_gpu_job_forks_from_a_server_that_never_touched_cuda(server):
    assert job_server.spawn(exit_with, 0, config=ENABLED, resources={"gpu": 1}).wait(timeout=60) == 0


def test_the_server_key_follows_import_time_environment_not_thread_counts(monkeypatch):
    base = job_server.fingerprint()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    assert job_server.fingerprint() == base  # Snakemake sets these per job; the child applies them
    monkeypatch.setenv("HF_HOME", "/elsewhere")
    assert job_server.fingerprint() != base


def test_every_rules_benchmark_file_parallels_its_log():
    """The sidecar of a server-run job is found from its log path: results/logs/X.log -> results/benchmarks/X.tsv."""
    pairs = 0
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=rule |checkpoint |    rule )", smk.read_text()):
            log = re.search(r"\blog:\s*\n\s*f?\"([^\"]+)\"", block)
            bench = re.search(r"\bbenchmark:\s*\n\s*f?\"([^\"]+)\"", block)
            if log and bench:
                pairs += 1
                sidecar = job_server._server_usage_path(Smk(config={}, log=[log.group(1)]))
                assert str(sidecar) == bench.group(1) + ".server.json", block[:80]
    assert pairs >= 25


def test_costs_add_the_server_childs_cpu_and_take_its_peak_memory(tmp_path):
    bench = tmp_path / "benchmarks" / "evaluate"
    bench.mkdir(parents=True)
    header = "s\th:m:s\tmax_rss\tcpu_time\n"
    (bench / "m.val.tsv").write_text(header + "10.0\t0:00:10\t40.0\t0.5\n")
    (bench / "m.val.tsv.server.json").write_text(json.dumps({"cpu_s": 8.25, "max_rss_mb": 700.0}))
    (bench / "n.val.tsv").write_text(header + "5.0\t0:00:05\t300.0\t4.0\n")
    jobs = read_benchmarks(tmp_path / "benchmarks").set_index("name")
    assert jobs.loc["m.val", "cpu_s"] == pytest.approx(8.75)
    assert jobs.loc["m.val", "max_rss_mb"] == 700.0
    assert jobs.loc["n.val", "cpu_s"] == 4.0 and jobs.loc["n.val", "max_rss_mb"] == 300.0
    assert isinstance(jobs, pd.DataFrame) and len(jobs) == 2
