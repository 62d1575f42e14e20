import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lamdagent.actions.launch import distributed_command, gpu_count


@pytest.mark.parametrize("resources, expected", [
    ({}, 0),
    (None, 0),
    ({"gpu": 2}, 2),
    ({"gpus": "4"}, 4),
    ({"gpu": 1, "gpus": 1}, 1),
    ({"mem_mb": 1000}, 0),
    (SimpleNamespace(gpu=8), 8),  # Snakemake's Resources gives attribute access
    (SimpleNamespace(mem_mb=10), 0),
])
def test_gpu_count(resources, expected):
    assert gpu_count(resources) == expected


@pytest.mark.parametrize("resources", [{"gpu": -1}, {"gpus": "two"}, {"gpu": 2, "gpus": 4}, {"gpu": True}])
def test_gpu_count_rejects_bad_values(resources):
    with pytest.raises(ValueError):
        gpu_count(resources)


@pytest.mark.parametrize("n", [0, 1])
def test_single_device_runs_in_process(n):
    assert distributed_command(n, "lamdagent.actions.train", ["--args-json", "a.json"]) is None


def test_multi_gpu_command_is_standalone_torchrun():
    cmd = distributed_command(4, "lamdagent.actions.train", ["--args-json", "a.json"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd and "--nnodes=1" in cmd
    # the module and its own arguments come last, after all launcher flags
    assert cmd[-4:] == ["-m", "lamdagent.actions.train", "--args-json", "a.json"]
    assert not any(part.startswith("--master-port") for part in cmd)


def test_main_port_pins_static_rendezvous():
    cmd = distributed_command(2, "lamdagent.actions.train", [], main_port=29611)
    assert "--master-port=29611" in cmd and "--standalone" not in cmd
    with pytest.raises(ValueError):
        distributed_command(2, "lamdagent.actions.train", [], main_port=70000)


def test_bad_module_name_is_rejected():
    with pytest.raises(ValueError):
        distributed_command(2, "lamdagent/actions/train.py", [])


def test_torchrun_accepts_the_command_line(tmp_path):
    """The built flags are real torchrun flags: run it on CPU with a trivial module (2 workers)."""
    # One file per worker: two workers printing to one pipe can interleave their lines.
    (tmp_path / "probe_mod.py").write_text(
        "import os, sys, json, pathlib\n"
        "record = {'rank': os.environ['RANK'], 'world': os.environ['WORLD_SIZE'], 'argv': sys.argv[1:]}\n"
        "pathlib.Path(f\"rank{os.environ['RANK']}.json\").write_text(json.dumps(record))\n"
    )
    cmd = distributed_command(2, "probe_mod", ["--x", "1"])
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in records) == ["0", "1"]
    assert all(r["world"] == "2" and r["argv"] == ["--x", "1"] for r in records)
