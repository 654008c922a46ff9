"""Llama family: parity with transformers, KV cache, padding, save/load round trip, classifier."""

import random

import pytest
import torch

from lmforge.models import hub, llama
from lmforge.tasks.classify import SequenceClassification
from lmforge.tokenizer import train_tokenizer
from lmforge.train.logging import Run
from lmforge.train.loop import TrainConfig, fit

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


def tiny_hf_classifier(tied: bool = False, seed: int = 8):
    torch.manual_seed(seed)
    config = tiny_hf(tied).config
    config.num_labels = 3
    return tf.LlamaForSequenceClassification(config).eval()


def test_sequence_classification_matches_transformers():
    hf = tiny_hf_classifier()
    cfg = llama.LlamaConfig.from_hf(hf.config.to_dict())
    ours = llama.LlamaForSequenceClassification(cfg).eval()
    ours.load_state_dict(llama.from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    assert cfg.num_labels == 3 and cfg.n_kv_heads == 2
    left, left_mask = left_padded()
    right, right_mask = left.flip(1), left_mask.flip(1)  # right-padded with pad_token_id 0
    with torch.no_grad():
        expected = hf(right, attention_mask=right_mask).logits  # (B, 3)
        torch.testing.assert_close(ours(right, right_mask), expected)
        torch.testing.assert_close(ours(right), expected)  # no mask: last token found by pad_token_id
        expected = hf(left, attention_mask=left_mask, position_ids=hf_positions(left_mask)).logits
        torch.testing.assert_close(ours(left, left_mask), expected)
    assert set(llama.to_hf_state_dict(ours.state_dict(), cfg)) == set(hf.state_dict())


def test_classifier_head_on_a_checkpoint_and_saved_classifier_round_trip(tmp_path):
    lm = tiny_hf(tied=True, seed=9)
    lm.save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    ours = hub.load_model(tmp_path / "lm", architecture="LlamaForSequenceClassification", num_labels=3)
    assert type(ours) is llama.LlamaForSequenceClassification and ours.score.weight.shape == (3, 32)
    torch.testing.assert_close(ours.model.embed.weight, lm.model.embed_tokens.weight)
    hub.save(ours, tmp_path / "cls")
    hf = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    reloaded = hub.load_model(tmp_path / "cls")
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 3
    ids, mask = left_padded()
    ids, mask = ids.flip(1), mask.flip(1)
    with torch.no_grad():
        expected = ours(ids, mask)
        torch.testing.assert_close(hf(ids, attention_mask=mask).logits, expected)
        torch.testing.assert_close(reloaded(ids, mask), expected)


def test_classifier_trains_with_sequence_classification(tmp_path):
    rng = random.Random(0)
    words = ["the", "a", "cat", "sat", "on", "mat", "big", "small", "tree", "red"]
    rows = [{"text": " ".join(rng.choices(words, k=rng.randint(3, 8)))} for _ in range(240)]
    for row in rows:
        row["label"] = "red" if "red" in row["text"].split() else "no"
    (tmp_path / "text.txt").write_text("\n".join(r["text"] for r in rows), encoding="utf-8")
    tok = train_tokenizer("bpe", tmp_path / "text.txt", vocab_size=200)
    task = SequenceClassification(rows[:200], rows[200:], tok, batch_size=16)
    torch.manual_seed(0)
    model = llama.LlamaForSequenceClassification(llama.LlamaConfig(
        vocab_size=len(tok), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_len=64))
    cfg = TrainConfig(max_steps=60, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_every=0,
                      log_every=5)
    state = fit(model, task, cfg, Run(tmp_path / "run"))
    assert state["accuracy"] > 0.9 and state["val_loss"] < 0.3, state
