"""What a study searches and how it is configured: search-space checks and overrides, the rule's space, the start
points (and those a --space override excludes), custom policies' spaces, the default data folder, StudyConfig's
checks and its round trip through the command line, and the creation of a study with its start points."""

from __future__ import annotations

import shutil

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from study_helpers import tiny  # noqa: F401  (fixture)

import torch

from kvzap_lab.data import Dataset
from kvzap_lab.model import describe, fingerprint
from kvzap_lab.studies import rule
from kvzap_lab.studies.space import Choice, Float, Int, SpaceError, check_space, contains, override, suggest
from kvzap_lab.study import StudyConfig, StudyError, cli, storage
from kvzap_lab.study.bench import default_data_dir, load_data, subsample
from kvzap_lab.study.config import CALIBRATED_EVICTION, OTHER_PROFILE, PROFILE_FIELDS, PROFILES, profile_for
from kvzap_lab.study.search import SearchSpace, build_space, start_points, trainable_factory


def test_space_checks_overrides_and_sampling():
    with pytest.raises(SpaceError, match="inverted"):
        check_space({"lr": Float(1e-2, 1e-4, log=True)})
    with pytest.raises(SpaceError, match="empty"):
        check_space({"depth": Int(2, 2)})
    with pytest.raises(SpaceError, match="low bound must be > 0"):
        check_space({"lr": Float(0.0, 1.0, log=True)})
    with pytest.raises(SpaceError, match="no values"):
        check_space({"window": Choice(())})
    with pytest.raises(SpaceError, match="empty"):
        check_space({})
    space = {"lr": Float(1e-4, 1e-2, log=True, default=5e-3), "depth": Int(1, 3, default=1), "window": Choice((8, 32), default=32)}
    with pytest.raises(SpaceError, match="inverted"):
        override(space, ["lr=1e-2:1e-4"])
    with pytest.raises(SpaceError, match="no dimension 'width'.*lr, depth, window"):
        override(space, ["width=4:8"])
    with pytest.raises(SpaceError, match="NAME=LOW:HIGH"):
        override(space, ["lr"])
    changed = override(space, ["lr=1e-3:2e-3", "depth=2", "window=8,16"])
    assert changed["lr"] == Float(1e-3, 2e-3, log=True, default=None)  # the old default fell outside
    assert changed["depth"] == Choice((2,), default=None) and changed["window"] == Choice((8, 16))
    assert contains(changed["lr"], 1.5e-3) and not contains(changed["lr"], 5e-3)
    assert contains(changed["window"], 16) and not contains(changed["window"], 32)
    trials = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = suggest(trials.ask(), changed)
        assert 1e-3 <= values["lr"] <= 2e-3 and values["depth"] == 2 and values["window"] in (8, 16)


def test_rule_space_follows_the_scores_and_builds_per_layer_taus(tiny):
    spec = describe(tiny[2])
    scores = np.random.default_rng(0).normal(-3.0, 1.0, size=(500, spec.n_layers, spec.n_kv_heads))
    dims = rule.space(spec, scores)
    assert dims["tau"].low <= -9.0 and dims["tau"].high >= np.quantile(scores, 0.98)  # paper grid and data both covered
    assert [f"tau_offset_{i}" for i in range(spec.n_layers)] == [k for k in dims if k.startswith("tau_offset_")]
    scores = np.random.default_rng(0).normal(-3.0, 1.0, size=(2000, 2, 2))
    taus = rule.calibrated_taus(scores, (0.7, 0.8))
    assert [np.mean(scores < t) for t in taus] == pytest.approx([0.7, 0.8], abs=0.02)
    values = {"tau": -5.0, "window": 16} | {f"tau_offset_{i}": 0.5 * i for i in range(spec.n_layers)}
    threshold = rule.build(values, spec.n_layers)
    assert threshold.tau == tuple(-5.0 + 0.5 * i for i in range(spec.n_layers)) and threshold.window == 16


def test_start_points_follow_the_scores_and_skip_taus_outside_the_space(tiny):
    spec = describe(tiny[2])
    scores = np.random.default_rng(0).normal(-3.0, 1.0, size=(2000, spec.n_layers, spec.n_kv_heads))
    rules = rule.space(spec, scores)
    space = SearchSpace(scorer={"width": Int(4, 16, default=8)}, rule=rules, fixed={})
    points, skipped = start_points(space, spec, scores)
    expected = rule.calibrated_taus(scores, CALIBRATED_EVICTION)
    assert [(kind, params["tau"]) for params, kind in points] == (
        [("paper", t) for t in rule.paper_taus(spec.model_type)] + [("calibrated", t) for t in expected])
    assert all(params["width"] == 8 and params["window"] == 32 for params, _ in points) and skipped == []
    # A fixed tau (a Choice now) excludes every start point: skipped with a message, none left to fail.
    fixed = SearchSpace(scorer=space.scorer, rule=override(rules, ["tau=-2"]), fixed={})
    points, skipped = start_points(fixed, spec, scores)
    assert points == [] and skipped == [
        "paper start points at tau -9, -8, -7, -6 skipped: outside the searched tau {-2}",
        f"calibrated start points at tau {', '.join(f'{t:g}' for t in expected)} skipped: outside the searched tau {{-2}}",
    ]
    # A range that excludes part of the paper grid keeps the points inside it.
    ranged = SearchSpace(scorer=space.scorer, rule=override(rules, ["tau=-8.5:-6.5"]), fixed={})
    points, skipped = start_points(ranged, spec, scores)
    assert [params["tau"] for params, kind in points if kind == "paper"] == [-8.0, -7.0]
    assert skipped[0] == "paper start points at tau -9, -6 skipped: outside the searched tau [-8.5, -6.5]"


def test_custom_policy_declares_its_space_next_to_its_class(tiny, tmp_path):
    spec = describe(tiny[2])
    (tmp_path / "mine.py").write_text(
        "from kvzap_lab.policies.kvzap_linear import KVzapLinear\n"
        "from kvzap_lab.studies.space import Float\n"
        "class Mine(KVzapLinear):\n"
        "    @staticmethod\n"
        "    def search_space(spec):\n"
        "        return {'alpha': Float(0.5, 2.0 * spec.hidden_size, log=True, default=1.0)}\n"
        "class NoSpace(KVzapLinear):\n"
        "    pass\n"
    )
    scores = np.zeros((10, spec.n_layers, spec.n_kv_heads))
    spec_name = f"{tmp_path / 'mine.py'}:Mine"
    space = build_space(spec_name, trainable_factory(spec_name), spec, scores, [])
    assert space.scorer == {"alpha": Float(0.5, 2.0 * spec.hidden_size, log=True, default=1.0)}
    assert "tau" in space.rule
    # A subclass without its own space, registered under no name of studies/: clear error (not the parent's space).
    with pytest.raises(StudyError, match="has no search space"):
        other = f"{tmp_path / 'mine.py'}:NoSpace"
        build_space(other, trainable_factory(other), spec, scores, [])
    # Built-ins: the MLP default width is the paper's hidden/8.
    mlp = build_space("mlp", trainable_factory("mlp"), spec, scores, [])
    assert mlp.baseline(-7.0)["width"] == spec.hidden_size // 8 and mlp.baseline(-7.0)["tau"] == -7.0


def test_train_rows_draw_a_seeded_subsample_with_held_out_rows_in_proportion(tiny):
    def rows(n: int, start: int) -> dict:
        ids = torch.arange(start, start + n)
        return {"X": ids.view(n, 1, 1).expand(n, 2, 3).to(torch.bfloat16), "y": ids.view(n, 1, 1).expand(n, 2, 1).float(), "groups": ids}

    train, test = rows(100, 0), rows(20, 1000)
    full = Dataset(train["X"], train["y"], test["X"], test["y"], {}, train["groups"], test["groups"])
    small = subsample(full, 10, seed=3)
    assert (len(small.y_train), len(small.y_test)) == (10, 2) and small.X_train.dtype == torch.float32
    kept = small.groups_train
    assert torch.equal(kept, kept.sort().values) and len(set(kept.tolist())) == 10  # distinct rows, in order
    assert torch.equal(small.X_train[:, 0, 0], kept.float()) and torch.equal(small.y_train[:, 1, 0], kept.float())
    assert torch.equal(small.groups_test, subsample(full, 10, seed=3).groups_test)  # seeded
    assert not torch.equal(kept, subsample(full, 10, seed=4).groups_train)
    assert len(subsample(full, 500, seed=0).y_train) == 100  # at most what there is
    _, data_dir, model = tiny
    whole, part = (load_data(model, None, "model", data_dir, None, 40, 0, rows) for rows in (0, 16))
    assert whole.X_train.dtype == part.X_train.dtype == torch.float32 and len(part.y_train) == 16 < len(whole.y_train)


def test_default_data_dir_reuses_collect_output_unless_it_is_another_models(tiny, tmp_path):
    _, data_dir, model = tiny
    fp = fingerprint(model)
    assert default_data_dir(tmp_path, "model", fp, "model-x") == tmp_path / "data" / "model"  # nothing there yet
    shutil.copytree(data_dir, tmp_path / "data" / "model")
    assert default_data_dir(tmp_path, "model", fp, "model-x") == tmp_path / "data" / "model"  # ours: reused
    assert default_data_dir(tmp_path, "model", "0" * 16, "model-x") == tmp_path / "data" / "model-x"


def test_config_checks_its_values_and_round_trips_through_the_command_line():
    config = StudyConfig(policy="gbdt", n_trials=9, timeout=30.5, objectives="reward", sampler="cmaes", seed=3,
                         tasks=["copy"], space=["max_iter=20:80", "tau=-2"], baseline=False, grace_period=5, data="d",
                         max_flops_ratio=0.02)
    argv = config.to_argv()
    assert argv[:2] == ["--policy", "gbdt"] and "--no-baseline" in argv and argv.count("--space") == 2
    assert argv[argv.index("--max-flops-ratio") + 1] == "0.02" and StudyConfig(policy="mlp").max_flops_ratio == 0.015
    assert cli.config_from_args(cli.parser().parse_args(argv)) == config
    assert StudyConfig(policy="mlp").to_argv() == ["--policy", "mlp"]
    assert StudyConfig(policy="mlp").identity("kvzap_mlp", "f" * 16) == {
        "policy": "kvzap_mlp", "model": "f" * 16, "tasks": ["single_needle", "multi_key_needle"], "context_tokens": 512,
        "samples_per_task": 24, "chunk_size": 128, "batch_size": 128, "train_rows": 0, "eval_seed": 10_000, "objectives": "pareto"}
    bad = [
        ({"sampler": "cmaes"}, "--sampler cmaes optimises one objective; --objectives pareto has 2: use --sampler tpe, nsga2, random"),
        ({"sampler": "grid"}, "sampler must be one of tpe, nsga2, random, cmaes"),
        ({"objectives": "speed"}, "objectives must be one of pareto, reward"),
        ({"n_trials": 0}, "n_trials must be an int >= 1"),
        ({"timeout": float("nan")}, "timeout must be a number of seconds > 0"),
        ({"tasks": ["nosuch"]}, "unknown tasks \\['nosuch'\\]"),
        ({"workers": 2, "parent_run_id": "x"}, "parent_run_id is for the worker processes"),
        ({"max_flops_ratio": 1.5}, "max_flops_ratio must be a fraction in \\[0, 1\\] \\(1: no limit\\); got 1.5"),
        ({"max_flops_ratio": -0.1}, "max_flops_ratio must be a fraction in \\[0, 1\\]"),
        ({"max_flops_ratio": float("nan")}, "max_flops_ratio must be a fraction"),
        ({"max_flops_ratio": "0.1"}, "max_flops_ratio must be a fraction"),
    ]
    for change, message in bad:
        with pytest.raises(StudyError, match=message):
            StudyConfig(policy="mlp", **change)
    for sampler in ("tpe", "nsga2", "random"):  # several objectives
        StudyConfig(policy="mlp", sampler=sampler)


def test_the_model_profile_gives_the_defaults_and_flags_override_them():
    smol, profile = StudyConfig(policy="mlp", model="smollm2-135m"), PROFILES["smollm2-135m"]
    assert [getattr(smol, name) for name in PROFILE_FIELDS] == [getattr(profile, name) for name in PROFILE_FIELDS]
    assert smol.chunk_size == 0 and smol.n_trials < StudyConfig(policy="mlp").n_trials  # shared prefills, few trials
    assert profile_for("testbed") == ("testbed", PROFILES["testbed"]) and profile_for("runs/model") == ("other", OTHER_PROFILE)
    override = StudyConfig(policy="mlp", model="smollm2-135m", n_trials=3, chunk_size=128)
    assert (override.n_trials, override.chunk_size, override.batch_size) == (3, 128, profile.batch_size)
    # the workers get the overrides only: they resolve the same profile
    assert override.to_argv() == ["--policy", "mlp", "--n-trials", "3", "--model", "smollm2-135m", "--chunk-size", "128"]
    assert cli.config_from_args(cli.parser().parse_args(override.to_argv())) == override
    assert f"smollm2-135m {profile.n_trials}" in " ".join(cli.parser().format_help().split())  # --help names them
    assert "one chunk, prefilled once per batch and shared by every trial" in profile.describe("smollm2-135m")
    for name in ("chunk_size", "train_rows"):
        with pytest.raises(StudyError, match="chunk_size and train_rows must be >= 0; got .*-1"):
            StudyConfig(policy="mlp", **{name: -1})


def test_creation_queues_the_start_points_once_and_completes_a_killed_creator():
    store = optuna.storages.InMemoryStorage()
    points = [({"tau": float(t), "window": 32}, "paper") for t in (-9, -8)] + [({"tau": -2.5, "window": 32}, "calibrated")] * 2
    identity = {"objectives": "pareto", "model": "m"}
    sampler = optuna.samplers.RandomSampler(seed=0)
    # A creator killed after queueing three start points: the study has them, without the "all queued" mark.
    killed = optuna.create_study(study_name="s", storage=store, directions=["maximize"] * 2)
    killed.set_user_attr("identity", identity)
    for params, kind in points[:3]:  # the second of two equal calibrated points is missing
        killed.enqueue_trial(params, user_attrs={"baseline": kind})
    study, created = storage.open_study(store, "s", identity, "pareto", sampler, None, points)
    assert not created
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.system_attrs["fixed_params"], t.user_attrs["baseline"]) for t in waiting] == points  # in order, once
    # (the two equal calibrated points are both there, as a creator that was not killed queues them)
    assert study.user_attrs[storage.START_POINTS_DONE]
    storage.open_study(store, "s", identity, "pareto", sampler, None, points)  # a later start queues nothing
    assert len(study.get_trials()) == 4
    # A new study gets them all; other settings on the same name are refused.
    fresh, created = storage.open_study(store, "t", identity, "pareto", sampler, None, points)
    assert created and len(fresh.get_trials(states=(TrialState.WAITING,))) == 4
    with pytest.raises(StudyError, match="model: study has 'm', this run has 'n'"):
        storage.open_study(store, "t", identity | {"model": "n"}, "pareto", sampler, None, points)
    with pytest.raises(StudyError, match="created with --objectives pareto"):
        storage.open_study(store, "t", identity | {"objectives": "reward"}, "reward", sampler, None, points)
