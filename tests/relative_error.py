"""Whole-tensor errors against the float64 oracle, for low precisions where an elementwise atol/rtol
says little: at bf16's 2e-2 it let a dk scaled by 0.97 pass (tests/test_relative_error.py), and
for large values (fp16 logits in the thousands) only a tolerance relative to the largest value
is meaningful."""
import torch

from attention_cases import Case, make_inputs, run

NAMES = ("out", "lse", "dq", "dk", "dv")
BF16_TOLERANCE = 1e-2
"""||got - ref|| / ||ref|| allowed in bf16: the torch backend measures 1.5e-3 to 3.3e-3 over CASES on
CPU; a 3% error is 3e-2."""


def relative_error(got: torch.Tensor, want: torch.Tensor, ord: float = 2) -> float:
    """||got - want|| / ||want|| over all elements, in float64 (``ord`` 2: the Euclidean norm;
    ``float('inf')``: the largest difference relative to the largest value). Entries where ``want``
    is not finite (the -inf lse of a query that sees no key) must be equal in ``got`` and are left
    out. 0.0 when both are all zero."""
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite], want[~finite]), "non-finite entries differ"
    difference = torch.linalg.vector_norm(torch.where(finite, got - want, 0.0), ord)
    norm = torch.linalg.vector_norm(torch.where(finite, want, 0.0), ord)
    return 0.0 if norm == 0 and difference == 0 else (difference / norm).item()


def assert_outputs_close(got, want, tolerance: float, ord: float = 2) -> None:
    """Each of out, lse, dq, dk, dv in ``got`` within ``tolerance`` (relative_error with ``ord``) of
    its counterpart in ``want``; the message names the first that is not."""
    for name, g, w in zip(NAMES, got, want):
        error = relative_error(g, w, ord)
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


def assert_close_to_reference(backend: str, case: Case, dtype: torch.dtype, tolerance: float, *,
                              ord: float = 2, inputs=None, scale: float = 1.0, device: str = "cpu") -> None:
    """The backend's out, lse, dq, dk, dv within ``tolerance`` of the float64 oracle's on the same
    inputs (``inputs``, or make_inputs(case, dtype, scale=scale)): assert_outputs_close."""
    q, k, v = (t.to(device) for t in (inputs or make_inputs(case, dtype, scale=scale)))
    want = run("reference", case, q.double(), k.double(), v.double())
    assert_outputs_close(run(backend, case, q, k, v), want, tolerance, ord)
