"""The frame every study shares: intervals, tests, the report header and the index of `study all`."""

from __future__ import annotations

import json
import math

import pytest

from ldmkit.study import _index
from ldmkit.study.common import Study, compare, fmt_ci, mean_ci, welch_p


def test_mean_ci_is_the_student_t_interval():
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0
    assert h == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)  # t_{0.975, 2} · s / √n
    assert math.isnan(mean_ci([5.0])[1]) and math.isnan(mean_ci([])[0])
    assert fmt_ci([1.0, 2.0, 3.0], 100, 1, " %") == "200.0 ± 248.4 %"


def test_compare_resolves_only_clear_differences():
    a, b = [1.0, 1.1, 0.9, 1.05], [2.0, 2.1, 1.9, 2.05]
    assert compare(a, b) == -1 and compare(b, a) == 1
    assert compare([1.0, 2.0, 3.0], [1.5, 2.5, 2.0]) == 0
    assert welch_p([1.0], [2.0]) == 1.0  # undefined with one value: never "resolved"


def test_report_header_says_when_other_work_shared_the_cpu(tmp_path, monkeypatch):
    import os

    import torch

    study = Study("x", "A title", tmp_path, progress=False)
    study.claim("c", "m 1", "supported")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, torch.get_num_threads() + 3.0, 0.0))
    assert "other work shared the CPU" in study.write().read_text()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, float(torch.get_num_threads()), 0.0))
    text = study.write().read_text()
    assert "other work shared the CPU" not in text and f"on {torch.get_num_threads()} CPU thread(s)" in text


def test_index_lists_every_claim_with_its_run(tmp_path):
    reports = {}
    for name, minutes in (("vae", 21.5), ("unet", 12.1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "verdicts.json").write_text(json.dumps(
            {"study": name, "budget": 1, "seeds": 3, "minutes": minutes, "run_training_minutes": minutes - 2,
             "claims": [{"claim": f"{name} claim", "measurement": "1", "verdict": "depends", "why": ""}]}))
        reports[name] = tmp_path / name / "report.md"
    text = _index(tmp_path, reports).read_text()
    assert "[vae](vae/report.md)" in text and "| vae claim | depends |" in text
    assert "21.5 min" in text and "12.1 min" in text and "3 seeds" in text
