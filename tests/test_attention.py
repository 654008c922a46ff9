"""Attention with dropout (spelled out, causal attention in blocks of query rows) and the dropout masks
drawn by several threads."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lmforge.models import attention
from lmforge.models import dropout as dropout_module
from lmforge.models.attention import Attention
from lmforge.models.dropout import PARALLEL_MIN, dropout, uniform


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _grads(module, x, run):
    module.zero_grad()
    x = x.detach().requires_grad_()
    out = run(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return out.detach(), [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("case", ["causal", "causal-gqa", "padding-mask"])
def test_dropout_path_with_masks_of_ones_equals_sdpa(monkeypatch, case):
    """With dropout replaced by the identity, the spelled-out training path (blocks of 64 query rows
    over 150 positions: 3 blocks, the last one partial) gives SDPA's outputs and gradients."""
    torch.manual_seed(0)
    module = Attention(32, 4, n_kv_heads=2 if case == "causal-gqa" else None, dropout=0.5)
    x = torch.randn(2, 150, 32)
    mask, is_causal = None, True
    if case == "padding-mask":
        keep = torch.ones(2, 150, dtype=torch.bool)
        keep[1, 100:] = False
        mask, is_causal = keep[:, None, None, :], False
    drawn = []
    monkeypatch.setattr(attention, "dropout", lambda probs, p: drawn.append(probs.shape) or probs)
    spelled = _grads(module.train(), x, lambda t: module(t, mask, is_causal))
    reference = _grads(module.eval(), x, lambda t: module(t, mask, is_causal))
    for a, b in zip([spelled[0]] + spelled[1], [reference[0]] + reference[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if is_causal:  # each block of queries against only the keys it may see
        assert drawn == [(2, 4, 64, 64), (2, 4, 64, 128), (2, 4, 22, 150)]
    else:
        assert drawn == [(2, 4, 150, 150)]


def test_attention_dropout_zeroes_probabilities_at_rate_p(monkeypatch):
    torch.manual_seed(0)
    module = Attention(64, 4, dropout=0.25).train()
    dropped = []

    def record(probs, p):
        out = dropout(probs, p)
        dropped.append(((out == 0) & (probs > 0)).sum() / (probs > 0).sum())
        return out

    monkeypatch.setattr(attention, "dropout", record)
    module(torch.randn(8, 256, 64), None, True)
    assert len(dropped) == 4 and all(abs(float(f) - 0.25) < 0.01 for f in dropped)


def test_large_masks_are_drawn_in_parallel_and_follow_the_seed(two_threads, monkeypatch):
    shape = (PARALLEL_MIN // 100, 200)  # 2 x PARALLEL_MIN elements: drawn in parts
    torch.manual_seed(3)
    a = uniform(shape, torch.float32, "cpu")
    torch.manual_seed(3)
    assert torch.equal(a, uniform(shape, torch.float32, "cpu"))
    assert not torch.equal(a, uniform(shape, torch.float32, "cpu"))
    for part in a.view(-1).chunk(dropout_module.PARTS):  # every part filled, uniformly
        assert 0 <= part.min() and part.max() < 1 and abs(float(part.mean()) - 0.5) < 0.01
    torch.set_num_threads(1)  # the same masks whatever the thread count
    torch.manual_seed(3)
    assert torch.equal(a, uniform(shape, torch.float32, "cpu"))
    torch.set_num_threads(2)
    pools = []
    real = dropout_module._threads
    monkeypatch.setattr(dropout_module, "_threads", lambda n, pid: pools.append(n) or real(n, pid))
    uniform(shape, torch.float32, "cpu")
    uniform((PARALLEL_MIN // 2,), torch.float32, "cpu")  # small: one thread, no pool
    assert pools == [1]


def test_parallel_masks_replay_under_gradient_checkpointing(two_threads):
    """Checkpointing restores the default generator before recomputing; the threads' generators are
    seeded from it, so backward sees the forward's mask: d(out)/dx equals out when x is all ones."""
    x = torch.ones(2 * PARALLEL_MIN, requires_grad=True)
    out = checkpoint(lambda t: dropout(t, 0.3), x, use_reentrant=False)
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())
    assert abs(float((out == 0).float().mean()) - 0.3) < 0.01
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))

