"""The benchmark's split of a request's time, read from the server's own /metrics text."""

import pytest

from bench.figures import stages_text
from bench.server import StageSnapshot
from router.metrics import Metrics
from tests.unit.test_metrics import entry


def snapshot(metrics: Metrics) -> StageSnapshot:
    return StageSnapshot.parse(metrics.render().decode())


def test_stage_means_come_from_the_difference_of_two_scrapes() -> None:
    metrics = Metrics(max_input_length=512)
    metrics.answered("embed", 0.0, 0.5, {entry(5, 0.5, 0.75): 2.0})  # before the workload
    metrics.batch_inference.observe(9.0)
    before = snapshot(metrics)
    metrics.answered("embed", 10.0, 10.002, {entry(5, 10.002, 10.003): 10.010})
    metrics.answered("embed", 20.0, 20.004, {entry(5, 20.004, 20.007): 20.020})
    metrics.batch_inference.observe(0.004)
    metrics.batch_inference.observe(0.006)

    stages = snapshot(metrics) - before
    assert stages.mean_ms("total") == pytest.approx(15.0)
    assert stages.mean_ms("tokenize") == pytest.approx(3.0)
    assert stages.mean_ms("queue") == pytest.approx(2.0)
    assert stages.mean_ms("trip") == pytest.approx(10.0)
    assert stages.mean_ms("compute") == pytest.approx(5.0)
    assert stages_text(stages) == "15.00: 3.00 / 2.00 / 10.00; 5.00"


def test_a_workload_without_answers_has_no_means() -> None:
    metrics = Metrics(max_input_length=512)
    stages = snapshot(metrics) - snapshot(metrics)
    assert stages.mean_ms("total") is None
    assert stages_text(stages) == "n/a: n/a / n/a / n/a; n/a"


def test_gpu_verdict_says_which_target_is_met() -> None:
    from bench.figures import gpu_verdict

    line = gpu_verdict({"corpus": (1.77e6,), "queries 1": (2.6e-3, 385.0)}, 106e3)
    assert "corpus 1.77M tok/s >= 1.2M (met)" in line
    assert "vs encode 16.7x >= 8x (met)" in line
    assert "one query p50 2.60 ms <= 2.5 ms (NOT met)" in line
