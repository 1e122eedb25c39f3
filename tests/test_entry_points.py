"""Custom policies found for real: an installed distribution's entry point, and ``file.py:Class`` through a CLI."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvzap_lab.policy import ENTRY_POINT_GROUP, get_policy, list_policies

REPO = Path(__file__).resolve().parents[1]
SCORER = textwrap.dedent(
    '''
    class ValueNorm:
        """Score = ||v||."""

        accumulates_attention = False

        def score(self, hidden, layer, *, keys=None, values=None, positions=None):
            return values.float().norm(dim=-1)
    '''
)


@pytest.fixture
def installed_package(tmp_path, monkeypatch):
    """A distribution ``my-lab-policies`` on sys.path, declaring one policy in the kvzap_lab.policies group."""
    site = tmp_path / "site"
    (site / "my_lab_policies").mkdir(parents=True)
    (site / "my_lab_policies" / "__init__.py").write_text(SCORER)
    dist = site / "my_lab_policies-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-lab-policies\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nvalue_norm_ep = my_lab_policies:ValueNorm\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("my_lab_policies", None)


def test_an_installed_entry_point_is_listed_and_built(installed_package):
    assert "value_norm_ep" in list_policies()
    policy = get_policy("value_norm_ep")
    assert type(policy.scorer.wrapped).__module__ == "my_lab_policies"  # a plain class: adapted (ScorerAdapter)
    values = torch.ones(1, 2, 3, 4)
    torch.testing.assert_close(policy.scorer.score(None, 0, values=values), torch.full((1, 2, 3), 2.0))


def test_without_the_distribution_the_name_is_unknown():
    with pytest.raises(ValueError, match="unknown policy 'value_norm_ep'"):
        get_policy("value_norm_ep")


def _evaluate(policy_spec, tmp_path, extra_env=None):
    argv = [sys.executable, "-m", "kvzap_lab.evaluate", "--policies", policy_spec, "--keep-ratios", "0.5",
            "--tasks", "single_needle", "--context-tokens", "64", "--n-samples", "2", "--out", str(tmp_path / "e.jsonl"),
            "--json"]  # fmt: skip
    env = dict(os.environ, **(extra_env or {}))
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_entry_point_and_file_policies_through_the_evaluate_cli(installed_package, tmp_path):
    done = _evaluate("value_norm_ep", tmp_path, {"PYTHONPATH": str(installed_package)})
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["policy"] for row in summary["summary"]] == ["value_norm_ep"]
    policy_file = tmp_path / "mine.py"
    policy_file.write_text(SCORER)
    done = _evaluate(f"{policy_file}:ValueNorm", tmp_path / "file")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["summary"][0]["policy"] == f"{policy_file}:ValueNorm"
    assert 0 < summary["summary"][0]["compression"] < 1
    missing = _evaluate(f"{tmp_path / 'nope.py'}:ValueNorm", tmp_path / "missing")
    assert missing.returncode == 2 and "nope.py does not exist" in missing.stderr.strip().splitlines()[-1]
