"""The whole-tensor comparison that the bf16 and large-fp16 kernel tests use can fail where it must:
a 3% scaling that bf16's elementwise 2e-2 tolerance lets through fails the bf16 bound, and a real
bf16 computation (the torch backend on CPU) passes it."""
import pytest
import torch

from attention_cases import CASES, make_inputs, run
from relative_error import BF16_TOLERANCE, assert_close_to_reference, assert_outputs_close, relative_error


def test_a_3_percent_scaling_fails_the_bf16_bound():
    """bf16 torch-backend outputs with dk scaled by 0.97: the elementwise check passes the scaled dk,
    the bf16 bound fails it (and only it)."""
    case = next(c for c in CASES if c.name == "q_after_kv")
    q, k, v = make_inputs(case, torch.bfloat16)
    got = list(run("torch", case, q, k, v))
    want = run("reference", case, q.double(), k.double(), v.double())
    assert_outputs_close(got, want, BF16_TOLERANCE)
    got[3] = (got[3].double() * 0.97).bfloat16()
    torch.testing.assert_close(got[3].double(), want[3], atol=2e-2, rtol=2e-2)    # what the old check passed
    assert relative_error(got[3], want[3]) == pytest.approx(0.03, abs=3e-3)
    with pytest.raises(AssertionError, match=r"^dk: relative error 3\.\d\de-02 > 1e-02"):
        assert_outputs_close(got, want, BF16_TOLERANCE)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bf16_torch_backend_is_within_the_bf16_bound(case):
    assert_close_to_reference("torch", case, torch.bfloat16, BF16_TOLERANCE)


def test_no_key_rows_are_left_out_and_must_agree():
    want = torch.tensor([float("-inf"), 2.0, 4.0])
    assert relative_error(torch.tensor([float("-inf"), 2.0, 4.2]), want, ord=float("inf")) == pytest.approx(0.05)
    with pytest.raises(AssertionError, match="non-finite entries differ"):
        relative_error(torch.tensor([0.0, 2.0, 4.0]), want)
