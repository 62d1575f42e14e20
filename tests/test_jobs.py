"""The job wrapper: agent jobs of the random controller start without importing torch (~2 s each)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys
from types import SimpleNamespace
from lamdagent.workflow.common import job_context
smk = SimpleNamespace(rule=sys.argv[1], log=[sys.argv[2]], threads=1, config={"controller": {"type": sys.argv[3]}})
with job_context(smk):
    pass
sys.__stdout__.write(json.dumps("torch" in sys.modules))
"""


@pytest.mark.parametrize("rule, controller, wants_torch", [
    ("propose", "random", False),
    ("update_memory", "openai", False),
    ("propose", "transformers", True),
    ("evaluate", "random", True),
])
def test_job_context_imports_torch_only_where_needed(tmp_path, rule, controller, wants_torch):
    result = subprocess.run([sys.executable, "-c", SCRIPT, rule, str(tmp_path / "job.log"), controller],
                            cwd=REPO, capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert json.loads(result.stdout) is wants_torch
    assert f"{rule} finished" in (tmp_path / "job.log").read_text()
