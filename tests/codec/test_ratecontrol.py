import math

import pytest

from vc_quant.codec.ratecontrol import Trial, search_rate, split_log_step


def hevc_step(qp):
    return (qp - 4) / 6


@pytest.mark.parametrize("e", [-0.5, 0.0, 1.37, 3.99, 7.5])
def test_split_log_step_reconstructs_e(e):
    qp, amp = split_log_step(e, hevc_step, 0, 51)
    assert 2 ** (-1 / 6) - 1e-9 < amp <= 1.0
    assert math.isclose(hevc_step(qp) - math.log2(amp), e, abs_tol=1e-9)


def test_split_log_step_clamps_at_the_finest_qp():
    qp, amp = split_log_step(-5.0, hevc_step, 0, 51)
    assert (qp, amp) == (0, 1.0)


@pytest.mark.parametrize("target", [1.5, 2.5, 4.0, 6.0])
def test_search_hits_target_with_few_full_encodes(target):
    # a nonlinear, slightly biased "codec": the sample mispredicts by 3%
    def rate(e):
        return 8.0 / (1 + 2 ** (e - 1.0))

    full_calls = []

    def full(e):
        full_calls.append(e)
        return Trial(e, rate(e), None)

    best, trials = search_rate(lambda e: rate(e) * 1.03, full, target, e_start=3.0, tolerance=0.02)
    assert abs(best.rate - target) <= 0.02
    assert len(trials) == len(full_calls) <= 3
