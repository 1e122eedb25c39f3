"""Rules, registry and training-free scorers of the policy API."""

import math
import re
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch

import kvzap_lab.policy as policy_mod
from kvzap_lab.policy import Policy, Threshold, TopK, calibrate, get_policy, list_policies, register_policy

REPO = Path(__file__).resolve().parents[1]
BUILTINS = ["kvzap_linear", "kvzap_mlp", "kvzap_shared", "gbdt", "oracle", "random", "streaming_llm", "knorm", "accumulated_attention"]


def _all_valid(scores):
    return torch.ones_like(scores, dtype=torch.bool)


def test_threshold_global_per_layer_per_head():
    scores = torch.tensor([[[-5.0, -3.0, 0.0], [-7.0, -4.0, 1.0]]])  # [1, 2 heads, 3]
    valid = torch.tensor([[[True, True, False], [True, True, True]]])
    assert Threshold(tau=-4.0).keep(scores, 0, valid).tolist() == [[[False, True, False], [False, True, True]]]
    per_layer = Threshold(tau=[-10.0, -3.5])
    assert torch.equal(per_layer.keep(scores, 0, valid), valid)  # everything above -10 except padding
    assert per_layer.keep(scores, 1, valid).tolist() == [[[False, True, False], [False, False, True]]]
    per_head = Threshold(tau=[[-6.0, 0.5], [0.0, 0.0]])
    assert per_head.keep(scores, 0, valid).tolist() == [[[True, True, False], [False, False, True]]]
    with pytest.raises(ValueError, match="3 per-head taus for layer 0; the scores have 2 KV heads"):
        Threshold(tau=[[0.0, 0.0, 0.0]]).keep(scores, 0, valid)
    with pytest.raises(ValueError, match="taus for 2 layers; asked for layer 2"):
        per_layer.keep(scores, 2, valid)
    with pytest.raises(ValueError, match="same shape"):
        Threshold().keep(scores, 0, valid[..., :2])


@pytest.mark.parametrize("per", ["global", "layer", "head"])
def test_calibrate_hits_target_compression_on_fresh_scores(per):
    rng = np.random.default_rng(0)
    shift = np.array([[0.0, 3.0], [-2.0, 1.0]])  # layers and heads on different scales, as in real models
    held_out, fresh = (rng.normal(size=(20000, 2, 2)) + shift for _ in range(2))
    rule = calibrate(held_out, 0.7, per=per, window=16, sinks=2)
    assert (rule.window, rule.sinks) == (16, 2)
    removed = np.stack(
        [(~rule.keep(torch.tensor(fresh[:, layer].T[None]), layer, torch.ones(1, 2, 20000, dtype=torch.bool))).float().mean(-1)[0].numpy()
         for layer in range(2)]
    )  # [layers, heads]
    assert abs(removed.mean() - 0.7) < 0.02
    if per == "head":
        assert np.abs(removed - 0.7).max() < 0.02
    if per == "global":
        assert np.abs(removed - 0.7).max() > 0.2  # one tau cannot fit heads on different scales
    with pytest.raises(ValueError, match="compression is the fraction"):
        calibrate(held_out, 1.5)
    with pytest.raises(ValueError, match="NaN or inf"):
        calibrate(np.full((3, 2, 2), np.nan), 0.5)


def test_topk_per_head_and_across_heads():
    scores = torch.tensor([[[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 3.0, 4.0]]])
    per_head = TopK(budget=2).keep(scores, 0, _all_valid(scores))
    assert per_head.tolist() == [[[True, True, False, False], [False, False, True, True]]]
    adakv = TopK(budget=2, across_heads=True).keep(scores, 0, _all_valid(scores))
    assert adakv.tolist() == [[[True, True, True, True], [False, False, False, False]]]  # budget moves to the better head
    valid = torch.tensor([[[True, False, True, False], [False, False, False, True]]])
    padded = TopK(budget=2).keep(scores, 0, valid)
    assert padded.tolist() == [[[True, False, True, False], [False, False, False, True]]]  # padding never kept
    # offered again (as the engine does at every decoding step), the kept set is stable
    assert torch.equal(TopK(budget=2).keep(scores, 0, per_head), per_head)
    by_ratio = TopK(keep_ratio=0.5).keep(scores, 0, valid)
    assert by_ratio.tolist() == [[[True, False, False, False], [False, False, False, True]]]  # ceil(half) of offered
    with pytest.raises(ValueError, match="an int >= 0; got 0.5"):
        TopK(budget=0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        TopK(keep_ratio=2.0)


def test_registry_lists_builtins_and_rejects_unknown_names():
    names = list_policies()
    assert set(BUILTINS) <= set(names)
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; known policies: .*kvzap_mlp.*streaming_llm"):
        get_policy("nope")
    with pytest.raises(TypeError, match="no keep\\(\\) method"):
        Policy("broken", scorer=get_policy("knorm").scorer, rule=object())


def test_register_policy_and_entry_points(monkeypatch):
    @register_policy("test_register_const")
    class Const:
        accumulates_attention = False

        def __init__(self, value=1.0):
            self.value = value

        def score(self, hidden, layer, *, keys=None, values=None, positions=None):
            return torch.full(hidden.shape[:2], self.value)[:, None, :]

    policy = get_policy("test_register_const", value=3.0, rule=TopK(budget=1))
    assert policy.scorer.score(torch.zeros(1, 5, 8), 0).unique().tolist() == [3.0]
    with pytest.raises(ValueError, match="already registered"):
        register_policy("knorm")(Const)

    ep = EntryPoint(name="test_ep_knorm", value="kvzap_lab.policies.knorm:KNormScorer", group=policy_mod.ENTRY_POINT_GROUP)
    monkeypatch.setattr(policy_mod, "entry_points", lambda group: [ep] if group == policy_mod.ENTRY_POINT_GROUP else [])
    assert "test_ep_knorm" in list_policies()
    keys = torch.randn(1, 2, 6, 4)
    assert torch.equal(get_policy("test_ep_knorm").scorer.score(None, 0, keys=keys), -keys.norm(dim=-1))


def test_policy_from_file(tmp_path):
    path = tmp_path / "my_policy.py"
    path.write_text(textwrap.dedent("""
        import torch
        class Recent:
            accumulates_attention = False
            def score(self, hidden, layer, *, keys=None, values=None, positions=None):
                return positions.float()[:, None, :].expand(-1, keys.shape[1], -1)
    """))
    policy = get_policy(f"{path}:Recent")
    keys, positions = torch.randn(1, 2, 4, 8), torch.arange(4)[None]
    assert policy.scorer.score(None, 0, keys=keys, positions=positions)[0, 1].tolist() == [0, 1, 2, 3]
    with pytest.raises(AttributeError, match="does not define 'Missing'; classes defined there: \\['Recent'\\]"):
        get_policy(f"{path}:Missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_policy(f"{tmp_path}/absent.py:Recent")


def test_training_free_scorers():
    b, h, t, d = 2, 2, 10, 8
    keys, values = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    positions = torch.arange(100, 100 + t).expand(b, t)
    hidden = torch.randn(b, t, 32)

    def run(name, **kw):
        return get_policy(name, **kw).scorer.score(hidden, 0, keys=keys, values=values, positions=positions)

    assert torch.equal(run("knorm"), -keys.norm(dim=-1))
    assert torch.equal(run("random", seed=3), run("random", seed=3)) and not torch.equal(run("random", seed=3), run("random", seed=4))
    acc = get_policy("accumulated_attention")
    assert acc.scorer.accumulates_attention and acc.scorer.score(hidden, 0, keys=keys).abs().sum() == 0

    streaming = get_policy("streaming_llm")
    scores = streaming.scorer.score(hidden, 0, keys=keys, positions=positions)
    assert scores.shape == (b, h, t)
    assert not streaming.rule.keep(scores, 0, _all_valid(scores)).any()  # only sinks + window survive
    assert TopK(budget=3).keep(scores, 0, _all_valid(scores))[..., -3:].all()  # under a budget: the most recent
    for name in ("knorm", "random", "streaming_llm", "accumulated_attention"):
        with pytest.raises(ValueError, match="needs keys"):
            get_policy(name).scorer.score(hidden, 0)


def test_oracle_looks_scores_up_by_absolute_position():
    oracle = get_policy("oracle").scorer
    with pytest.raises(RuntimeError, match="call set_scores"):
        oracle.score(None, 0, positions=torch.arange(3)[None])
    table = torch.arange(2 * 2 * 6, dtype=torch.float32).reshape(2, 2, 6)  # [layers, kv_heads, positions]
    oracle.set_scores(table)
    out = oracle.score(None, 1, positions=torch.tensor([[4, 5, 6, 7]]))
    assert out[0, :, :2].tolist() == table[1, :, 4:6].tolist()
    assert torch.isinf(out[0, :, 2:]).all()  # positions without an oracle score are kept
    with pytest.raises(ValueError, match="oracle table is for batch 1"):
        oracle.score(None, 0, positions=torch.zeros(2, 3, dtype=torch.long))


def _snippet() -> str:
    """The first python block of README.md's '## Writing your own policy' section."""
    text = (REPO / "README.md").read_text()
    assert "## Writing your own policy" in text, "README.md lost its '## Writing your own policy' section"
    section = text.split("## Writing your own policy", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_custom_policy_snippet_runs(capsys):
    code = _snippet()
    assert len(code.strip().splitlines()) <= 30
    exec(compile(code, "README snippet", "exec"), {})
    match = re.fullmatch(r"kept (\d+)% of the out-of-window pairs\n", capsys.readouterr().out)
    assert match and 10 < int(match.group(1)) < 90
    assert "value_norm" in list_policies()
    assert math.isclose(get_policy("value_norm").rule.window, policy_mod.DEFAULT_WINDOW)
