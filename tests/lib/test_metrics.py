"""lissa_influence.metrics: agreement of scores, and the error trace a solver callback records."""

import math

import torch

from lissa_influence import CG, ErrorTrace, relative_error, score_agreement


def test_agreement_of_scores():
    ref = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    same = score_agreement(ref, ref, top_k=2)
    assert same["scores_error"] == 0 and same["pearson"] == 1 and same["top2_overlap"] == 1
    assert relative_error(2 * ref, ref) == 1
    assert math.isnan(score_agreement(torch.ones(1, 4), ref[:1])["pearson"])


def test_an_error_trace_follows_a_solve():
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    b = torch.ones(2, 3, dtype=torch.float64)
    trace = ErrorTrace({"dense": torch.linalg.solve(A, b.T).T}, rows=2)
    CG(tol=1e-12, block=False).solve(A, b, callback=trace)
    errors = [e for _, e in trace.points["dense"]]
    assert len(errors) >= 2 and errors[-1] <= 1e-10 and trace.points["dense"][0][0] == 1.0
