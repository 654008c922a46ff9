"""models/linear.py: the oneDNN path gives F.linear's values and gradients, and is taken only when training."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.models import linear as L

pytestmark = pytest.mark.skipif(not L.AVAILABLE, reason="oneDNN is not available in this PyTorch build")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    """The path under test, whatever this CPU's default is (it is off with AVX2 only)."""
    monkeypatch.setattr(L, "ENABLED", True)


def test_default_follows_the_cpu_and_the_environment(monkeypatch):
    for capability, expected in (("AVX512", True), ("AVX2", False), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert L._wanted(None) is expected and L._wanted("") is expected
        assert L._wanted("1") is True and L._wanted("0") is False
    with pytest.raises(ValueError, match="LMFORGE_ONEDNN='yes'.*1 \\(on\\), 0 \\(off\\)"):
        L._wanted("yes")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 48), (5, 48), (2, 3, 4, 48)])
def test_values_and_gradients_equal_f_linear(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(96, 48, requires_grad=True)
    b = torch.randn(96, requires_grad=True) if bias else None
    grad = torch.randn(*shape[:-1], 96)
    ours = L.linear(x, w, b)
    ours.backward(grad)
    got = [t.grad.clone() for t in (x, w, b) if t is not None]
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    ref = F.linear(x, w, b)
    ref.backward(grad)
    torch.testing.assert_close(ours, ref)
    for g, t in zip(got, [t for t in (x, w, b) if t is not None], strict=True):
        torch.testing.assert_close(g, t.grad)


def test_taken_only_when_autograd_records(monkeypatch):
    calls = []
    monkeypatch.setattr(L, "_matmul_t", lambda *a: calls.append(1) or torch.ops.mkldnn._linear_pointwise(
        a[0], a[1], a[2] if len(a) > 2 else None, "none", [], ""))
    layer = L.Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer(x)
    assert not calls  # inference: PyTorch's own F.linear
    layer(x).sum().backward()
    assert len(calls) == 2  # forward and the weight gradient (x needs none)
    frozen = L.Linear(16, 8).requires_grad_(False)
    frozen(x)
    assert len(calls) == 2  # nothing to differentiate: F.linear


def test_non_contiguous_input_and_frozen_weight():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    x = torch.randn(16, 5, 3).permute(2, 1, 0).requires_grad_()  # (3, 5, 16), not contiguous
    L.linear(x, w).pow(2).sum().backward()
    g = x.grad.clone()
    x.grad = None
    F.linear(x, w).pow(2).sum().backward()
    torch.testing.assert_close(g, x.grad)


def test_first_token_rows_weight_gradient():
    """The pooler's input `hidden[:, 0]` has rows a sequence apart; its transpose in the weight
    gradient is copied into a layout oneDNN computes with its fast kernels. Same values either way."""
    torch.manual_seed(0)
    hidden = torch.randn(6, 7, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    L.linear(hidden[:, 0], w).pow(2).sum().backward()
    got = w.grad.clone(), hidden.grad.clone()
    w.grad = hidden.grad = None
    F.linear(hidden[:, 0], w).pow(2).sum().backward()
    torch.testing.assert_close(got, (w.grad, hidden.grad))
    assert L._blas_layout(hidden[:, 0].t()).is_contiguous()
    view = torch.randn(16, 8).t()
    assert L._blas_layout(view) is view  # a plain transpose is taken as it is
