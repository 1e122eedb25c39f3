"""The autouse ``restore_global_state`` fixture: what one test changes, the next does not see (run in order)."""

import os
import random

import torch

from kvzap_lab.policy import get_policy, list_policies, register_policy, resolve_policy

MARK = "KVZAP_TEST_ISOLATION_MARK"


def test_a_test_that_leaks_everything(tmp_path):
    torch.set_num_threads(3)
    torch.manual_seed(123)
    random.seed(123)
    os.environ[MARK] = "leaked"

    @register_policy("isolation_leak")
    class Leak:
        accumulates_attention = False

        def score(self, hidden, layer, *, keys=None, values=None, positions=None):
            return values.norm(dim=-1)

    path = tmp_path / "p.py"
    path.write_text("class FromFile:\n    accumulates_attention = False\n    def score(self, h, l, **k):\n        return h\n")
    resolve_policy(f"{path}:FromFile")
    assert "isolation_leak" in list_policies()


def test_the_next_test_sees_none_of_it():
    assert torch.get_num_threads() == 1  # the session's setting (conftest.one_thread)
    assert MARK not in os.environ
    assert "isolation_leak" not in list_policies()
    assert "streaming_llm" in list_policies() and get_policy("streaming_llm").name == "streaming_llm"
    import sys

    assert not [m for m in sys.modules if m.startswith("kvzap_lab_user_policy_p_")]
    state, python_state = torch.get_rng_state(), random.getstate()
    torch.manual_seed(123)
    random.seed(123)
    assert not torch.equal(state, torch.get_rng_state())  # the RNGs were put back, not left at seed 123
    assert python_state != random.getstate()
