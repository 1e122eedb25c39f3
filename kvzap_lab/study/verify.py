"""The re-check of the study's pick on samples it never saw: picking the best of many trials on a few samples
flatters it, and this measures by how much."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from kvzap_lab import tasks
from kvzap_lab.faults import kill_point
from kvzap_lab.study.bench import Bench
from kvzap_lab.study.config import TARGET_COMPRESSION, VERIFY_SEED_OFFSET
from kvzap_lab.study.metrics import operating_point, within_tolerance
from kvzap_lab.study.objective import fit_trial_policy
from kvzap_lab.study.search import SearchSpace


def verify_best(study, row: dict | None, policy: str, factory, space: SearchSpace, bench: Bench, *, task_names: list[str],
                samples: int, context_tokens: int, seed: int) -> dict | None:
    """Re-check ``row`` (the best feasible point within the accuracy tolerance; None: nothing to check) on ``samples``
    fresh samples per task, drawn with seed ``VERIFY_SEED_OFFSET + seed``: its trial's scorer is re-fitted
    (deterministic) and answers them, as does the full cache. Kept in the study's user attributes (per trial
    and sample count), so a rerun does not redo it. None when ``samples`` is 0 or ``row`` is None."""
    if samples == 0 or row is None:
        return None
    key, done = f"{row['trial']}:{samples}", dict(study.user_attrs.get("verified", {}))
    if key not in done:
        fresh_seed = VERIFY_SEED_OFFSET + seed
        fresh = bench.with_samples({t: tasks.make_samples(t, bench.tokenizer, samples, context_tokens, fresh_seed) for t in task_names})
        full_key = f"verify_full_cache_accuracy:{samples}"
        full = study.user_attrs.get(full_key)
        if full is None:
            full = {t: fresh.run(None, t)["accuracy"] for t in tqdm(task_names, desc="verify: full cache")}
            study.set_user_attr(full_key, full)
        kill_point("study.verify")
        _, checked = fit_trial_policy(policy, factory, space, fresh, row["params"], seed)
        per_task = {t: fresh.run(checked, t) for t in tqdm(task_names, desc=f"verify: trial {row['trial']}")}
        full_mean = float(np.mean(list(full.values())))
        point = operating_point(per_task, full_mean)
        done[key] = {
            "trial": row["trial"], "samples_per_task": samples, "seed": fresh_seed, "full_accuracy": full_mean,
            **point,
            "target_met": within_tolerance(point["accuracy"], full_mean) and point["compression"] >= TARGET_COMPRESSION,
        }  # fmt: skip
        study.set_user_attr("verified", done)
    return done[key]
