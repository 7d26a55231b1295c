"""lissa_influence.reports: the diagnostics of query chunks merged into one."""

import pytest
import torch

from lissa_influence.reports import check_rows, merged_reports, timed


def test_chunk_reports_merge_into_one():
    first = {"solve": {"num_products": 4, "iterations": 2, "wall_time": 1.0, "converged": True, "final_residual": 1e-7}}
    second = {
        "solve": {"num_products": 6, "iterations": 3, "wall_time": 2.0, "converged": False, "final_residual": 1e-5}
    }
    for report, seconds in ((first, 0.5), (second, 0.25)):
        report["time"] = {"solve": seconds}
    merged = merged_reports([first, second])
    assert merged["solve"]["num_products"] == 10 and merged["solve"]["iterations"] == 5
    assert merged["solve"]["converged"] is False and merged["solve"]["final_residual"] == 1e-5
    assert merged["time"] == {"solve": 0.75} and len(merged["chunks"]) == 2


def test_timed_adds_up_and_rows_are_checked():
    timings: dict[str, float] = {}
    for _ in range(2):
        with timed(timings, "step"):
            pass
    assert set(timings) == {"step"} and timings["step"] >= 0
    check_rows("s", torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match=r"s must be \[k, 4\]"):
        check_rows("s", torch.zeros(2, 3), 4)
