"""Crash safety: an exploration killed with SIGKILL at 20 random moments resumes and finishes intact."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from kill_test import kill_test  # noqa: E402


@pytest.mark.slow(seconds=170)
def test_twenty_random_sigkills_then_a_rerun_finishes_with_nothing_corrupt(tmp_path, tiny_model_dir):
    report = kill_test(tmp_path / "run", tiny_model_dir, kills=20, seed=0, min_s=0.5, max_s=6.0, iterations=1)
    summary = "\n".join(report.lines() + report.corrupt_models + report.plan_mismatches)
    assert report.kills == 20, summary
    assert report.reruns_finished >= 1, summary
    assert report.corrupt_models == [], summary
    assert report.plan_mismatches == [], summary
    assert report.retrained == {}, summary
    assert report.leftovers == [], summary
    assert report.nothing_to_do, summary
