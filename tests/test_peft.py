"""PEFT: LoRA, AdaLoRA, adapters, IA3, prefix and prompt tuning; adapters saved/loaded in PEFT's format
and checked against `peft` itself on transformers models built from the same weights."""

import json
import math

import pytest
import torch

from lmforge.models import bert, gpt, hub, llama, t5
from lmforge.peft import (
    AdaLoraConfig,
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PrefixConfig,
    PromptConfig,
    adapter_state_dict,
    apply_adalora,
    apply_adapters,
    apply_ia3,
    apply_lora,
    apply_prefix,
    apply_prompt,
    collapse_prefix,
    load_adapter,
    merge_adalora,
    merge_ia3,
    merge_lora,
    replace_modules,
    resize_token_embeddings,
    save_adapter,
    unmerge_lora,
)
from lmforge.peft import adalora as adalora_mod
from lmforge.peft import ia3 as ia3_mod
from lmforge.peft import lora as lora_mod
from lmforge.peft.inject import input_embedding
from lmforge.peft.io import hf_names

V = 99


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = llama.LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_len=64)
        return llama.LlamaForCausalLM(cfg).eval()
    if family == "gpt":
        cfg = gpt.GPTConfig(vocab_size=V, dim=32, n_layers=2, n_heads=2, max_len=64, bos_token_id=None,
                            eos_token_id=None)
        return gpt.GPTForCausalLM(cfg).eval()
    cfg = bert.BertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_len=64, dropout=0.0,
                          attention_dropout=0.0, num_labels=3)
    return bert.BertForSequenceClassification(cfg).eval()


def ids(batch=2, length=8, seed=1):
    return torch.randint(1, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize(model, *names, std=0.1):
    """Give adapter parameters non-zero values (B of LoRA starts at zero)."""
    torch.manual_seed(123)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(x in n for x in names):
                p.normal_(std=std)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- LoRA

def test_lora_is_identity_at_init_and_merges_exactly():
    model = tiny("llama")
    x = ids()
    with torch.no_grad():
        before = model(x)
        apply_lora(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
        torch.testing.assert_close(model(x), before)
        randomize(model, "lora_b")
        adapted = model(x)
        assert not torch.allclose(adapted, before)
        lora_mod.merge(model)
        assert all(m.merged for m in lora_mod.lora_modules(model).values())
        torch.testing.assert_close(model(x), adapted)
        unmerge_lora(model)
        torch.testing.assert_close(model(x), adapted)
        saved = {k: v.clone() for k, v in adapter_state_dict(model).items()}
        plain = merge_lora(model)
        assert not lora_mod.lora_modules(plain) and type(plain.model.layers[0].attn.q_proj) is torch.nn.Linear
        torch.testing.assert_close(plain(x), adapted)
    assert set(saved) == {f"model.layers.{i}.{m}.lora_{ab}.weight" for i in range(2)
                          for m in ("attn.q_proj", "attn.v_proj", "mlp.down_proj") for ab in "ab"}


def test_merged_lora_exports_as_a_plain_checkpoint(tmp_path):
    model = tiny("gpt")
    apply_lora(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    randomize(model, "lora_b")
    x = ids()
    with torch.no_grad():
        adapted = model(x)
        hub.save(merge_lora(model), tmp_path / "merged")
        torch.testing.assert_close(hub.load_model(tmp_path / "merged")(x), adapted)


def test_unmerge_restores_base_weights():
    model = tiny("gpt")
    w = model.model.layers[0].attn.q_proj.weight.detach().clone()
    apply_lora(model, LoraConfig(r=2, targets=["q_proj"]))
    randomize(model, "lora_b")
    layer = model.model.layers[0].attn.q_proj
    layer.merge()
    assert not torch.allclose(layer.weight, w)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w)


def test_rslora_scale_and_state_dict_keys_unchanged():
    model = tiny("llama")
    base_keys = set(model.state_dict())
    apply_lora(model, LoraConfig(r=16, alpha=8, targets=["q_proj"], rslora=True))
    q = model.model.layers[0].attn.q_proj
    assert q.scale == pytest.approx(8 / math.sqrt(16))
    assert base_keys <= set(model.state_dict())  # the base model's keys stay where they were
    assert set(model.state_dict()) - base_keys == set(adapter_state_dict(model))
    assert tiny_lora_scale() == pytest.approx(8 / 16)


def tiny_lora_scale():
    model = tiny("llama")
    apply_lora(model, LoraConfig(r=16, alpha=8, targets=["q_proj"]))
    return model.model.layers[0].attn.q_proj.scale


def test_only_lora_and_modules_to_save_train():
    model = tiny("bert")
    apply_lora(model, LoraConfig(r=2, targets=["q_proj", "v_proj"], modules_to_save=["classifier"]))
    want = {f"bert.layers.{i}.attn.{m}.lora_{ab}.weight" for i in range(2) for m in ("q_proj", "v_proj")
            for ab in "ab"} | {"classifier.weight", "classifier.bias"}
    assert trainable(model) == want
    assert set(adapter_state_dict(model)) == want
    loss = model(ids()).sum()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in want)


def test_injection_raises_listing_every_missing_target():
    model = tiny("llama")
    with pytest.raises(ValueError) as e:
        apply_lora(model, LoraConfig(targets=["q_proj", "query", "c_attn"]))
    message = str(e.value)
    assert "query, c_attn" in message and "q_proj" in message.split("available")[1]
    assert not lora_mod.lora_modules(model)  # nothing half-applied
    with pytest.raises(ValueError, match="nope"):
        apply_lora(model, LoraConfig(targets=["q_proj"], modules_to_save=["nope"]))
    assert not lora_mod.lora_modules(model) and not hasattr(model, "peft")
    found = replace_modules(tiny("llama"), [r"re:model\.layers\.1\..*_proj"], lambda n, m: m)
    assert sorted(found) == sorted(f"model.layers.1.{m}" for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                                    "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                                    "mlp.down_proj"))


def test_embedding_output_requires_grad_for_gradient_checkpointing():
    model = tiny("llama")
    apply_lora(model, LoraConfig(targets=["q_proj"]))
    model.train()
    assert model.model.embed(ids()).requires_grad  # reentrant checkpoints then reach the LoRA weights
    x = ids()

    def checkpointed(layer, h, *args):
        return torch.utils.checkpoint.checkpoint(layer, h, *args, use_reentrant=True)

    h = model.model.embed(x)
    rope = model.model.rope(torch.arange(8)[None], h.dtype)
    checkpointed(model.model.layers[0], h, None, True, rope).sum().backward()
    assert model.model.layers[0].attn.q_proj.lora_a.weight.grad is not None


# ------------------------------------------------------------------------------- PEFT folder parity

HF_CLASSES = {"bert": "BertForSequenceClassification", "gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


@pytest.fixture(scope="module")
def peft():
    pytest.importorskip("transformers")
    return pytest.importorskip("peft")


def hf_twin(model, folder):
    """The same base weights in transformers: saved with hub.save, loaded with transformers."""
    tf = pytest.importorskip("transformers")
    hub.save(model, folder)
    return getattr(tf, HF_CLASSES[hub.family_of(model).__name__.rsplit(".", 1)[1]]).from_pretrained(folder).eval()


def outputs(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("family", ["bert", "gpt", "llama"])
def test_saved_lora_loads_in_peft_with_identical_outputs(family, tmp_path, peft):
    ours = tiny(family)
    hf = hf_twin(ours, tmp_path / "base")
    mts = ["classifier"] if family == "bert" else []
    apply_lora(ours, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], modules_to_save=mts))
    randomize(ours, "lora_b", "classifier")
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    x = ids()
    with torch.no_grad():
        base = outputs(hf, x)
        loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        assert not torch.allclose(outputs(loaded, x), base, atol=1e-3)  # the adapter is in effect
        torch.testing.assert_close(outputs(ours, x), outputs(loaded, x))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    expect = {"bert": ["query", "value"], "gpt": ["c_attn"], "llama": ["q_proj", "v_proj"]}[family]
    assert sorted(config["target_modules"]) == expect
    if family == "gpt":  # q and v fused into one block-structured LoRA of rank 8 with alpha 2 * 8
        assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (8, 16, True)
    # and back: our load of our own folder gives the same model again
    again = load_adapter(tiny(family), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(outputs(again, x), outputs(ours, x))
    assert set(adapter_state_dict(again)) == set(adapter_state_dict(ours))
    assert trainable(again) == trainable(ours)  # ready to resume training


def test_gpt2_fused_rslora_alpha(tmp_path, peft):
    ours = tiny("gpt")
    hf = hf_twin(ours, tmp_path / "base")
    apply_lora(ours, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "k_proj", "up_proj"], rslora=True))
    randomize(ours, "lora_b")
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 12 and config["lora_alpha"] == pytest.approx(8 * math.sqrt(3))  # c_attn: q, k, v
    assert config["rank_pattern"] == {"transformer.h.0.mlp.c_fc": 4, "transformer.h.1.mlp.c_fc": 4}
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(outputs(ours, x), outputs(loaded, x))


PEFT_TARGETS = {"bert": ["query", "value"], "gpt": ["c_attn"], "llama": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("family", ["bert", "gpt", "llama"])
def test_peft_saved_lora_loads_with_identical_outputs(family, tmp_path, peft):
    ours = tiny(family)
    hf = hf_twin(ours, tmp_path / "base")
    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[family], task_type=task,
                          fan_in_fan_out=family == "gpt", use_rslora=family == "llama")
    model = peft.get_peft_model(hf, cfg)
    randomize(model, "lora_B", "classifier")
    model.save_pretrained(tmp_path / "peft")
    mine = load_adapter(tiny(family), tmp_path / "peft")
    x = ids()
    with torch.no_grad():
        assert not torch.allclose(outputs(mine, x), outputs(tiny(family), x), atol=1e-3)
        torch.testing.assert_close(outputs(mine, x), outputs(model.eval(), x))
    assert (family == "bert") == ("classifier.weight" in adapter_state_dict(mine))


def test_resized_vocabulary_is_saved_and_restored(tmp_path):
    ours = tiny("llama")
    apply_lora(ours, LoraConfig(r=2, targets=["q_proj"]))
    resize_token_embeddings(ours, V + 5)  # tokens added to the tokenizer
    assert ours.model.embed.weight.requires_grad  # the new rows must train
    randomize(ours, "lora_b", "embed", "lm_head")
    save_adapter(ours, tmp_path / "adapter")
    again = load_adapter(tiny("llama"), tmp_path / "adapter")
    assert again.config.vocab_size == V + 5
    x = torch.randint(V, V + 5, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x))


def test_t5_lora_loads_in_peft_and_prefix_prompt_refuse_t5(tmp_path, peft):
    torch.manual_seed(0)
    cfg = t5.T5Config(vocab_size=V, dim=32, kv_dim=8, hidden_dim=64, n_layers=2, n_heads=4, dropout=0.0)
    ours = t5.T5ForConditionalGeneration(cfg).eval()
    hub.save(ours, tmp_path / "base")
    hf = pytest.importorskip("transformers").T5ForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    with pytest.raises(ValueError, match="prefix="):
        apply_prefix(ours, PrefixConfig())
    with pytest.raises(ValueError, match="encoder-decoder"):
        apply_prompt(ours, PromptConfig())
    apply_lora(ours, LoraConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]))  # self- and cross-attention
    randomize(ours, "lora_b")
    save_adapter(ours, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == ["q", "v", "wo"]
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x, y = ids(length=7), ids(length=5, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, decoder_input_ids=y), loaded(input_ids=x, decoder_input_ids=y).logits)


def test_names_follow_the_family_conversion():
    slots, _ = hf_names(tiny("gpt"))
    q, v = slots["model.layers.1.attn.q_proj"], slots["model.layers.1.attn.v_proj"]
    assert (q.hf, q.index, v.index, q.transposed) == ("transformer.h.1.attn.c_attn", 0, 2, True)
    slots, _ = hf_names(tiny("bert"))
    assert slots["bert.layers.0.attn.o_proj"].hf == "bert.encoder.layer.0.attention.output.dense"


# ------------------------------------------------------------------------------------------- AdaLoRA

def clm_steps(model, steps, allocator=None, lr=2e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        x = torch.randint(1, V, (4, 12), generator=g)
        x[:, 1::2] = (x[:, ::2] * 7) % V  # something learnable
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        if allocator is not None:
            loss = loss + allocator.regularization(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # as fit() does: the allocator kept the gradients it needs
        if allocator is not None:
            allocator.step(model, step)
    return model


def test_adalora_moves_rank_within_budget(tmp_path):
    model = tiny("llama")
    x = ids()
    with torch.no_grad():
        before = model(x)
    cfg = AdaLoraConfig(total_step=24, init_r=6, target_r=2, tinit=3, tfinal=4, alpha=8,
                        targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    allocator = apply_adalora(model, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)  # singular values start at zero
    assert allocator.budget(0) == (48, False)  # 8 matrices x init_r 6
    assert allocator.budget(21)[0] == allocator.budget(24)[0] == 16
    clm_steps(model, 24, allocator)
    ranks = allocator.ranks(model)
    assert len(ranks) == 8 and sum(ranks.values()) <= 2 * 8
    assert len(set(ranks.values())) > 1, ranks  # the budget went where it mattered
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(tiny("llama"), tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
        adapted = model(x)
        torch.testing.assert_close(merge_adalora(model)(x), adapted)
    assert not adalora_mod.svd_modules(model)


def test_adalora_without_allocator_steps_refuses_to_save(tmp_path):
    model = tiny("llama")
    apply_adalora(model, AdaLoraConfig(total_step=10, init_r=4, target_r=2))
    clm_steps(model, 3)  # a loop that never calls allocator.step
    with pytest.raises(RuntimeError, match="never stepped"):
        save_adapter(model, tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="never stepped"):
        merge_adalora(model)


def test_adalora_orthogonality_regularizer_has_gradients():
    model = tiny("gpt")
    allocator = apply_adalora(model, AdaLoraConfig(total_step=10, init_r=4, target_r=2, targets=["q_proj"]))
    reg = allocator.regularization(model)
    reg.backward()
    assert reg > 0 and model.model.layers[0].attn.q_proj.lora_A.grad.abs().sum() > 0


# --------------------------------------------------------------------------------- adapters and IA3

@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_bottleneck_adapters_identity_at_init_and_only_they_train(family, tmp_path):
    model = tiny(family)
    x = ids()
    with torch.no_grad():
        before = outputs(model, x)
        apply_adapters(model, AdapterConfig(bottleneck=8))
        torch.testing.assert_close(outputs(model, x), before)
    assert trainable(model) and all(".adapter_" in n for n in trainable(model))
    assert len(trainable(model)) == 2 * 2 * 4  # 2 layers x (o_proj, down_proj) x (down, up) x (weight, bias)
    randomize(model, "adapter_up")
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(tiny(family), tmp_path / "adapter")
    with torch.no_grad():
        assert not torch.allclose(outputs(model, x), before)
        torch.testing.assert_close(outputs(again, x), outputs(model, x))


def test_ia3_identity_at_init_merges_and_matches_peft(tmp_path, peft):
    model = tiny("llama")
    hf = hf_twin(model, tmp_path / "base")
    x = ids()
    with torch.no_grad():
        before = model(x)
        apply_ia3(model, IA3Config())
        torch.testing.assert_close(model(x), before)
    assert all(n.endswith("ia3_l") for n in trainable(model)) and len(trainable(model)) == 6
    randomize(model, "ia3_l", std=0.5)
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, before, atol=1e-3)
        ia3_mod.merge(model)
        torch.testing.assert_close(model(x), adapted)
        ia3_mod.unmerge_ia3(model)
        torch.testing.assert_close(model(x), adapted)
        save_adapter(model, tmp_path / "adapter")
        loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(x).logits, adapted)
        torch.testing.assert_close(merge_ia3(model)(x), adapted)


# ------------------------------------------------------------------------------------ prefix tuning

@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_prefix_generation_with_cache_equals_full_recomputation(family):
    base = tiny(family)
    model = apply_prefix(base, PrefixConfig(n_tokens=3, hidden=16)).eval()
    x, mask = ids(batch=3, length=6), torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    with torch.no_grad():
        assert not torch.allclose(model(x, mask)[mask.bool()], base(x, mask)[mask.bool()])
        cache = model.new_cache(3, 10)
        logits = model(x, mask, cache=cache)[:, -1]
        seq = x
        for _ in range(4):
            full = model(seq, mask)[:, -1]
            torch.testing.assert_close(logits, full)
            token = logits.argmax(-1, keepdim=True)
            seq, mask = torch.cat((seq, token), 1), torch.cat((mask, torch.ones_like(token)), 1)
            logits = model(token, mask, cache=cache)[:, -1]
        generated = model.generate(x, mask[:, :6], max_new_tokens=4)
        assert torch.equal(generated, seq)


@pytest.mark.parametrize("family", ["llama", "gpt", "bert"])
def test_prefix_padded_rows_equal_unpadded_and_collapse_is_exact(family):
    model = apply_prefix(tiny(family), PrefixConfig(n_tokens=4, hidden=16)).eval()
    x = ids(batch=2, length=7)
    mask = torch.ones_like(x)
    left = family != "bert"  # decoders pad left, BERT right
    pad = slice(0, 3) if left else slice(4, 7)
    real = slice(3, 7) if left else slice(0, 4)
    mask[1, pad] = 0
    with torch.no_grad():
        alone = model(x[1:, real])
        batched = model(x, mask)
        if family == "bert":
            torch.testing.assert_close(batched[1:], alone)  # classification logits
        else:
            torch.testing.assert_close(batched[1:, real], alone)
        before = model(x, mask)
        collapse_prefix(model)
        assert model.prefix_encoder.transform is None
        torch.testing.assert_close(model(x, mask), before)
    assert trainable(model) == {"prefix_encoder.embedding.weight"}


# ------------------------------------------------------------------------------------ prompt tuning

def test_prompt_tuning_trains_only_the_prompt_and_outputs_depend_on_it():
    base = tiny("llama")
    model = apply_prompt(base, PromptConfig(n_tokens=5))
    assert trainable(model) == {"prompt.embedding.weight"}
    x = ids(batch=2, length=6)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 6, V)
        model.prompt.embedding.weight.add_(0.5)
        assert not torch.allclose(model(x), out)
        assert torch.equal(input_embedding(base)[1](x), base.model.embed.weight[x])  # hook idle outside
    model.eval()
    with torch.no_grad():
        cache = model.new_cache(2, 9)
        logits = model(x, cache=cache)[:, -1]
        token = logits.argmax(-1, keepdim=True)
        step = model(token, cache=cache)[:, -1]
        torch.testing.assert_close(step, model(torch.cat((x, token), 1))[:, -1])
    model.train()
    loss = model(x).sum()
    loss.backward()
    assert model.prompt.embedding.weight.grad.abs().sum() > 0


def test_prompt_tuning_roundtrip_and_bert_classifier(tmp_path):
    model = apply_prompt(tiny("bert"), PromptConfig(n_tokens=3, init="random"))
    x = ids()
    with torch.no_grad():
        out = model(x, torch.ones_like(x))
        assert out.shape == (2, 3)
        save_adapter(model, tmp_path / "adapter")
        again = load_adapter(tiny("bert"), tmp_path / "adapter")
        torch.testing.assert_close(again(x, torch.ones_like(x)), out)


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_prefix_and_prompt_tuning_match_peft(family, tmp_path, peft):
    x = ids()
    for apply, cfg in ((apply_prefix, PrefixConfig(n_tokens=3, hidden=16)), (apply_prompt, PromptConfig(n_tokens=3))):
        name = cfg.__class__.__name__
        ours = apply(tiny(family), cfg).eval()
        save_adapter(ours, tmp_path / name)
        theirs = peft.PeftModel.from_pretrained(hf_twin(tiny(family), tmp_path / f"base-{name}"),
                                                tmp_path / name).eval()
        with torch.no_grad():
            expected = theirs(input_ids=x).logits[:, -x.shape[1]:]  # PEFT's prompt tuning keeps the P positions
            torch.testing.assert_close(ours(x), expected)
            theirs.save_pretrained(tmp_path / f"peft-{name}")
            again = load_adapter(tiny(family), tmp_path / f"peft-{name}")
            torch.testing.assert_close(again(x), expected)
