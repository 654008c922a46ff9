"""Llama family: parity with transformers, KV cache, padding, save/load round trip."""

import pytest
import torch

from lmforge.models import hub, llama

tf = pytest.importorskip("transformers")


def tiny_hf(tied: bool, n_kv_heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=n_kv_heads, intermediate_size=64, max_position_embeddings=64,
                            rope_theta=500.0, tie_word_embeddings=tied, pad_token_id=0)
    return tf.LlamaForCausalLM(config).eval()


def ours_from(hf):
    cfg = llama.LlamaConfig.from_hf(hf.config.to_dict())
    model = llama.LlamaForCausalLM(cfg).eval()
    model.load_state_dict(llama.from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    return model


def left_padded(batch=3, length=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
    return ids.masked_fill(mask == 0, 0), mask


def hf_positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_with_gqa_and_padding(tied):
    hf = tiny_hf(tied)
    ours = ours_from(hf)
    assert (ours.lm_head.weight is ours.model.embed.weight) == tied
    ids, mask = left_padded()
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits[0])
        ref = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        torch.testing.assert_close(ours(ids, mask)[real], ref[real])


def test_weights_convert_back_to_transformers():
    hf = tiny_hf(tied=False, n_kv_heads=1)
    ours = ours_from(hf)
    fresh = tf.LlamaForCausalLM(hf.config).eval()
    fresh.load_state_dict(llama.to_hf_state_dict(ours.state_dict(), ours.config), strict=True)
    ids, _ = left_padded()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_generation_matches_transformers(tied):
    hf = tiny_hf(tied, seed=3)
    ours = ours_from(hf)
    ids, mask = left_padded(seed=4)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=12), expected)


def test_beam_search_matches_transformers():
    hf = tiny_hf(tied=False, seed=5)
    ours = ours_from(hf)
    ids, mask = left_padded(batch=2, seed=6)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    got = ours.generate(ids, mask, max_new_tokens=8, num_beams=3, eos_token_id=[])
    assert torch.equal(got, expected)


def test_kv_cache_decoding_equals_full_recomputation():
    model = llama.LlamaForCausalLM(llama.PRESETS["llama-tiny"]).eval()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 12)
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_left_padding_does_not_change_real_rows():
    model = llama.LlamaForCausalLM(llama.PRESETS["llama-tiny"]).eval()
    ids, mask = left_padded(batch=3, length=10)
    for row in range(3):
        alone = ids[row : row + 1, mask[row].bool()]
        with torch.no_grad():
            torch.testing.assert_close(model(ids, mask)[row, mask[row].bool()], model(alone)[0])
        batched = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[])[row, 10:]
        assert torch.equal(batched, model.generate(alone, max_new_tokens=6, eos_token_id=[])[0, -6:])


def test_context_length_is_enforced():
    model = llama.LlamaForCausalLM(llama.PRESETS["llama-tiny"]).eval()
    with pytest.raises(ValueError, match="context length"):
        model.generate(torch.zeros(1, 250, dtype=torch.long), max_new_tokens=10)


def test_presets_build_and_config_round_trips():
    for name, cfg in llama.PRESETS.items():
        assert llama.LlamaConfig.from_hf(cfg.to_hf()) == cfg, name
        hf_cfg = tf.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "model_type"})
        assert hf_cfg.num_key_value_heads == cfg.n_kv_heads
    assert sum(p.numel() for p in llama.LlamaForCausalLM(llama.PRESETS["llama-tiny"]).parameters()) > 0


def test_saved_folder_loads_in_transformers_and_back(tmp_path):
    hf = tiny_hf(tied=True, seed=7)
    ours = ours_from(hf)
    hub.save(ours, tmp_path / "m")
    reloaded_hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    reloaded = hub.load_model(tmp_path / "m")
    ids, _ = left_padded()
    with torch.no_grad():
        torch.testing.assert_close(reloaded_hf(ids).logits, hf(ids).logits)
        torch.testing.assert_close(reloaded(ids), hf(ids).logits)
    assert reloaded.lm_head.weight is reloaded.model.embed.weight
