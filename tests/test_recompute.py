"""Gradient checkpointing (`train.gradient_checkpointing`): the same losses and gradients as an ordinary
step (dropout included), with far fewer activations kept for the backward pass."""

import pytest
import torch

from lmforge.models import bert, gpt, llama, recompute, t5
from lmforge.peft import LoraConfig, PrefixConfig, apply_lora, apply_prefix


def _bert():
    c = bert.BertConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_len=64)
    return bert.BertForMaskedLM(c), lambda m, ids: m(ids).float().pow(2).mean()


def _gpt():
    c = gpt.GPTConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, max_len=64, dropout=0.1, attention_dropout=0.1)
    return gpt.GPTForCausalLM(c), lambda m, ids: m(ids).pow(2).mean()


def _llama_lora():
    c = llama.LlamaConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, max_len=64)
    model = llama.LlamaForCausalLM(c)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"]))
    return model, lambda m, ids: m(ids).pow(2).mean()


def _bert_prefix():
    c = bert.BertConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_len=64, num_labels=3)
    model = apply_prefix(bert.BertForSequenceClassification(c), PrefixConfig(n_tokens=3, hidden=16))
    return model, lambda m, ids: m(ids).pow(2).mean()


def _t5():
    c = t5.T5Config(vocab_size=50, dim=32, kv_dim=8, hidden_dim=64, n_layers=2, n_heads=4, dropout=0.1)
    return t5.T5ForConditionalGeneration(c), lambda m, ids: m(ids, decoder_input_ids=ids[:, :7]).pow(2).mean()


def _step(build, on: bool):
    """One forward/backward from the same weights and RNG state: (loss, grads, bytes saved for backward)."""
    torch.manual_seed(0)
    model, loss_fn = build()
    model.train()
    recompute.enable(model, on)
    ids = torch.randint(1, 50, (4, 24), generator=torch.Generator().manual_seed(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(2)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(saved)


@pytest.mark.parametrize("build", [_bert, _gpt, _llama_lora, _bert_prefix, _t5],
                         ids=["bert", "gpt2", "llama-lora", "bert-prefix", "t5"])
def test_recomputed_step_equals_the_ordinary_one_and_keeps_less(build):
    loss, grads, kept = _step(build, on=False)
    loss_r, grads_r, kept_r = _step(build, on=True)
    assert loss_r == loss
    assert grads_r.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert kept_r < kept / 2  # the outer graph keeps each layer's input, not its activations


def test_eval_and_no_grad_are_untouched():
    model, _ = _gpt()
    recompute.enable(model)
    ids = torch.randint(1, 50, (2, 8))
    with torch.no_grad():
        model.train()
        a = model(ids)
    model.eval()
    torch.testing.assert_close(model(ids), model(ids))
    assert a.shape == (2, 8, 50)


def test_a_model_without_layers_is_an_error():
    with pytest.raises(ValueError, match="gradient_checkpointing=false"):
        recompute.enable(torch.nn.Linear(2, 2))
