"""The DDP gradient hook on two gloo processes."""

import pytest
import torch
from dist_workers import hook_contract, replica_gradients, spawn, train_run

from vc_quant import VcConfigError, VcInputError
from vc_quant.distributed import VcHookState, linear_schedule, vc_allreduce_hook


def test_hook_averages_the_decoded_streams_and_feeds_back_the_exact_residual(tmp_path):
    results = spawn(hook_contract, tmp_path, 2.5)
    for r in results:
        assert len(r["mean_diff"]) >= 3 and max(r["mean_diff"]) < 1e-6  # averaged = decoded mean of what was sent
        assert max(r["residual_diff"]) == 0.0  # error feedback keeps exactly what the codec dropped
        assert all(r["layout"]) and all(r["gains"])  # one gain per parameter, in the buffer's order
        assert r["stats"].payload_bytes == r["payload_bytes"]  # bytes counted = bitstream sizes
        assert r["stats"].bytes == r["wire_bytes"]  # + the size message and the padding
        assert 1.5 < r["stats"].bits_per_element < 3.5
        assert "before the first backward" in r["late_register"]


def test_every_rank_applies_bit_identical_gradients_with_three_ranks(tmp_path):
    # float sums depend on their order: every rank must add the decoded streams in the same (rank) order,
    # or the replicas drift apart (two ranks cannot show it: a + b == b + a)
    results = spawn(replica_gradients, tmp_path, 2.0, world=3)
    for other in results[1:]:
        for mine, theirs in zip(results[0]["grads"], other["grads"], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def test_training_converges_close_to_allreduce(tmp_path):
    ref = spawn(train_run, tmp_path / "a", "allreduce", 40)[0]
    vc = spawn(train_run, tmp_path / "b", "vc-2.5", 40)[0]
    assert vc["losses"][-1] < 0.5 * vc["losses"][0]  # it trains
    # measured on this task: final loss ratio 1.0x-1.1x of all-reduce (40 steps, 2.5 bits)
    assert vc["losses"][-1] < 1.3 * ref["losses"][-1]
    assert vc["bits"] < 3.0


class FakeBucket:
    def __init__(self, buffer):
        self._buffer = buffer

    def buffer(self):
        return self._buffer

    def index(self):
        return 0


def test_bad_arguments_are_refused():
    with pytest.raises(VcConfigError, match=r"bits=0\.5"):
        VcHookState(bits=0.5)
    with pytest.raises(VcConfigError, match="bits='2'"):
        VcHookState(bits="2")
    with pytest.raises(VcConfigError, match="preset='turbo'"):
        VcHookState(codec={"preset": "turbo"})
    with pytest.raises(VcInputError, match="not float"):
        vc_allreduce_hook(VcHookState(), FakeBucket(torch.zeros(10, dtype=torch.int64)))
    schedule = linear_schedule(1.5, 3.0, 10)
    assert schedule(0) == 1.5 and schedule(5) == 2.25 and schedule(99) == 3.0


def test_accelerate_registers_the_hook_on_the_prepared_model(tmp_path):
    from dist_workers import accelerate_prepare

    r0, r1 = spawn(accelerate_prepare, tmp_path)
    assert r0["wrapped"] == "DistributedDataParallel"
    assert r0["elements"] > 0  # the vc hook reduced the gradients
    assert torch.equal(r0["grad"], r1["grad"])  # every rank holds the same averaged gradient


def test_the_trainer_registers_the_hook_when_it_wraps_the_model(tmp_path):
    from dist_workers import trainer_hook

    r0, _ = spawn(trainer_hook, tmp_path)
    assert r0["wrapped"] == "DistributedDataParallel" and r0["steps"] == 2
    assert r0["elements"] > 0
