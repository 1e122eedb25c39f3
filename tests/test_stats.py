"""Wilson score intervals, against values computed by hand."""

import pytest

from kvzap_lab.stats import format_interval, wilson_interval


@pytest.mark.parametrize(
    "accuracy, n, low, high",
    [
        # z = 1.959964; centre = (p + z^2/2n) / (1 + z^2/n); half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
        (0.5, 100, 0.40383, 0.59617),  # centre 0.5, half 1.959964 * 0.0509902 / 1.0384146
        (0.0, 10, 0.0, 0.27753),  # 0/10: centre = half = 0.1920765 / 1.3841459
        (1.0, 20, 0.83887, 1.0),  # 20/20: the mirror of 0/20
        (0.9, 20, 0.69897, 0.97213),
    ],
)
def test_wilson_interval_matches_hand_computed_values(accuracy, n, low, high):
    got = wilson_interval(accuracy, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_edges_and_bad_input():
    assert wilson_interval(0.3, 0) == (0.0, 1.0)
    low90, high90 = wilson_interval(0.5, 100, confidence=0.90)
    assert 0.40383 < low90 < 0.5 < high90 < 0.59617  # a lower confidence gives a narrower interval
    assert format_interval(0.5, 100) == "0.500 [0.404, 0.596]"
    for bad in [(1.5, 10), (0.5, -1)]:
        with pytest.raises(ValueError, match="need 0 <= accuracy <= 1, n >= 0"):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="0 < confidence < 1"):
        wilson_interval(0.5, 10, confidence=1.0)


@pytest.mark.parametrize("n", [1, 3, 7, 20, 100, 1000])
def test_the_interval_always_holds_the_estimate_at_the_bounds(n):
    for accuracy in (0.0, 1.0):
        low, high = wilson_interval(accuracy, n)
        assert low <= accuracy <= high
