"""The fused head + cross-entropy equals the plain one; the cheaper dropout has dropout's statistics."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.losses import linear_cross_entropy, output_head
from lmforge.models import gpt, llama
from lmforge.models.dropout import Dropout
from lmforge.tasks.clm import CausalLM


def test_linear_cross_entropy_matches_logits_path():
    torch.manual_seed(0)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    labels = torch.randint(0, 50, (300,))
    labels[::7] = -100
    expected = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="sum")
    want = torch.autograd.grad(expected * 0.5, (hidden, weight))
    got_loss = linear_cross_entropy(hidden, weight, labels, chunk=64)  # several chunks, one partial
    got = torch.autograd.grad(got_loss * 0.5, (hidden, weight))
    torch.testing.assert_close(got_loss, expected)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("make", [
    lambda: gpt.GPTForCausalLM(gpt.PRESETS["gpt-tiny"]),
    lambda: llama.LlamaForCausalLM(llama.PRESETS["llama-tiny"]),
])
def test_causal_lm_loss_takes_the_fused_path_with_the_same_result(make):
    torch.manual_seed(0)
    model = make().train()
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 4000).astype(np.uint16)
    split = type("S", (), {"tokens": tokens})
    task = CausalLM(split, split, seq_len=16, batch_size=4)
    batch = task.train_batch(0)
    assert output_head(model) is model.lm_head
    fused, n = task.loss(model, batch)
    fused.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(batch["input_ids"])
    plain = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    plain.backward()
    torch.testing.assert_close(fused, plain)
    assert n == batch["labels"].numel()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_dropout_statistics_and_eval_identity():
    torch.manual_seed(0)
    layer, x = Dropout(0.1), torch.ones(1000, 1000)
    y = layer(x)
    assert abs(float((y == 0).float().mean()) - 0.1) < 0.003
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    assert torch.equal(layer.eval()(x), x)


def test_attention_dropout_trains_and_is_off_in_eval():
    torch.manual_seed(0)
    model = gpt.GPTForCausalLM(gpt.GPTConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, max_len=16,
                                             attention_dropout=0.5, bos_token_id=None, eos_token_id=None))
    ids = torch.randint(0, 50, (2, 16))
    model.train()
    a, b = model(ids), model(ids)
    assert not torch.allclose(a, b)
    (a.sum() + b.sum()).backward()
    model.eval()
    torch.testing.assert_close(model(ids), model(ids))
