"""GPT-2 family: parity with transformers, weight conversion both ways, KV cache, padding, generation."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.models import gpt, hub

tf = pytest.importorskip("transformers")

V, PAD, EOS = 99, 1, 2


def hf_config(**kw):
    base = {"n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": V, "n_positions": 64,
            "bos_token_id": EOS, "eos_token_id": EOS}
    return tf.GPT2Config(**{**base, **kw})


def from_hf(hf, cls=gpt.GPTForCausalLM):
    cfg = gpt.GPTConfig.from_hf(hf.config.to_dict())
    ours = cls(cfg).eval()
    ours.load_state_dict(gpt.from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    return ours


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(hf_config(initializer_range=0.5)).eval()  # large weights: varied greedy tokens
    return hf, from_hf(hf)


def left_padded(lengths, total=None, seed=1):
    """A left-padded batch of random prompts: ids (B, T) and mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    T = total or max(lengths)
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, V, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


def test_logits_match_hf_right_padded(pair):
    hf, ours = pair
    ids, mask = left_padded([9, 5, 7])
    ids, mask = ids.flip(1), mask.flip(1)  # right padding
    real = mask.bool()
    torch.testing.assert_close(ours(ids, mask)[real], hf(ids, attention_mask=mask).logits[real])
    torch.testing.assert_close(ours(ids), hf(ids).logits)  # no mask: every position


def test_logits_match_hf_left_padded(pair):
    hf, ours = pair
    ids, mask = left_padded([9, 5, 7])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    expected = hf(ids, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(ours(ids, mask)[real], expected[real])


@pytest.mark.parametrize("tie", [True, False])
def test_weights_round_trip_to_hf(tie):
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(hf_config(tie_word_embeddings=tie)).eval()
    ours = from_hf(hf)
    assert (ours.lm_head.weight is ours.model.embed.weight) == tie
    state = gpt.to_hf_state_dict(ours.state_dict(), ours.config)
    assert ("lm_head.weight" in state) != tie  # a tied head is left out, as transformers saves it
    back = tf.GPT2LMHeadModel(tf.AutoConfig.for_model(**ours.config.to_hf())).eval()
    back.load_state_dict({"lm_head.weight": state["transformer.wte.weight"], **state}, strict=True)
    ids = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(back(ids).logits, hf(ids).logits)
    torch.testing.assert_close(ours(ids), hf(ids).logits)


@pytest.mark.parametrize("with_head", [False, True])
def test_hf_from_pretrained_reads_our_weights(pair, tmp_path, with_head):
    """A folder of our converted weights opens in transformers, with or without the tied head."""
    from safetensors.torch import save_file

    hf, ours = pair
    state = gpt.to_hf_state_dict(ours.state_dict(), ours.config)
    if with_head:
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    hf_dict = {**ours.config.to_hf(), "architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "config.json").write_text(json.dumps(hf_dict))
    loaded = tf.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(loaded(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("cls", [gpt.GPTForCausalLM, gpt.GPTForSequenceClassification])
def test_model_without_biases_exports_zero_biases_to_hf(cls):
    """nanoGPT's `bias=False`: no bias parameters here; transformers' GPT-2 gets zero biases and
    computes the same outputs."""
    torch.manual_seed(0)
    cfg = gpt.GPTConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, max_len=64, bias=False, act="gelu",
                        pad_token_id=PAD)
    ours = cls(cfg).eval()
    assert not any(name.endswith("bias") for name, _ in ours.named_parameters())
    state = gpt.to_hf_state_dict(ours.state_dict(), cfg)
    hf_cls = tf.GPT2LMHeadModel if cls is gpt.GPTForCausalLM else tf.GPT2ForSequenceClassification
    hf = hf_cls(tf.AutoConfig.for_model(**cfg.to_hf())).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # the tied head
    hf.tie_weights()
    ids = torch.randint(3, V, (2, 12))
    torch.testing.assert_close(ours(ids), hf(ids).logits)


def test_model_without_biases_saves_and_loads_without_biases(tmp_path):
    """config.json says `"bias": false`: lmforge reloads the model bias-free (nothing new to train),
    transformers ignores the key and reads the zero biases; both give the same logits."""
    torch.manual_seed(0)
    cfg = gpt.GPTConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, max_len=64, bias=False, act="gelu")
    ours = gpt.GPTForCausalLM(cfg).eval()
    hub.save(ours, tmp_path / "m")
    loaded = hub.load_model(tmp_path / "m")
    assert loaded.config == cfg and not any(n.endswith("bias") for n, _ in loaded.named_parameters())
    ids = torch.randint(3, V, (2, 12))
    torch.testing.assert_close(loaded(ids), ours(ids))
    torch.testing.assert_close(tf.GPT2LMHeadModel.from_pretrained(tmp_path / "m")(ids).logits, ours(ids))
    state = load_file(tmp_path / "m" / "model.safetensors")
    state["transformer.h.0.ln_1.bias"] += 0.5  # not a bias-free model after all
    save_file(state, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hub.CheckpointError, match="unexpected.*layers.0.attn_norm.bias"):
        hub.load_model(tmp_path / "m")


def test_bare_gpt2model_checkpoint_loads_into_every_model(pair):
    """Original GPT-2 checkpoints have no `transformer.` prefix, no head and old mask buffers."""
    hf, _ = pair
    bare = dict(hf.transformer.state_dict())
    bare["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    bare["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    cfg = gpt.GPTConfig.from_hf(hf.config.to_dict())
    state = gpt.from_hf_state_dict(bare, cfg)
    lm = gpt.GPTForCausalLM(cfg).eval()
    lm.load_state_dict(state, strict=True)
    ids = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(lm(ids), hf(ids).logits)
    assert lm.lm_head.weight.data_ptr() == lm.model.embed.weight.data_ptr()

    backbone = gpt.GPT(cfg).eval()
    backbone.load_state_dict(state, strict=True)
    torch.testing.assert_close(backbone(ids), hf.transformer(ids).last_hidden_state)
    assert set(gpt.to_hf_state_dict(backbone.state_dict(), cfg)) == set(hf.transformer.state_dict())
    classifier = gpt.GPTForSequenceClassification(cfg)
    assert classifier.load_state_dict(state, strict=False).missing_keys == ["score.weight"]


def test_backbone_accepts_head_model_weights(pair):
    hf, ours = pair
    backbone = gpt.GPT(ours.config).eval()
    result = backbone.load_state_dict(gpt.from_hf_state_dict(hf.state_dict(), ours.config), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["lm_head.weight"]
    ids = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(backbone(ids), hf.transformer(ids).last_hidden_state)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("stop", [False, True])
def test_generate_matches_hf(pair, num_beams, stop):
    hf, ours = pair
    ids, mask = left_padded([6, 9, 3])
    kw = {"max_new_tokens": 10, "num_beams": num_beams, "pad_token_id": PAD}
    if stop:  # an EOS that row 0 emits at step 2: rows finish at different times
        first = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=3, pad_token_id=PAD)
        kw["eos_token_id"] = int(first[0, -1])
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(ours.generate(ids, mask, **kw), expected)


def test_beam_search_row_does_not_depend_on_batch(pair):
    hf, ours = pair
    ids, mask = left_padded([6, 9, 3])
    kw = {"max_new_tokens": 10, "num_beams": 3, "pad_token_id": PAD, "eos_token_id": 79}
    alone = ours.generate(ids[2:, 6:], **kw)[0, 3:]  # row 2 has 3 real tokens
    assert torch.equal(alone, hf.generate(ids[2:, 6:], **kw)[0, 3:])
    in_batch = ours.generate(ids, mask, **kw)[2, 9:]  # padded to the longest row of the batch
    assert torch.equal(in_batch[: len(alone)], alone) and bool((in_batch[len(alone):] == PAD).all())


def test_kv_cache_matches_full_forward(pair):
    ours = copy.deepcopy(pair[1]).double()  # float64: fp32 rounding differs between the two paths
    ids, mask = left_padded([12, 4], total=16)
    prompt = 5  # row 1 is still all padding in the prompt
    cache = ours.new_cache(2, 16)
    steps = [ours(ids[:, :prompt], mask[:, :prompt], cache=cache)[:, -1]]
    for t in range(prompt, 16):
        steps.append(ours(ids[:, t:t + 1], mask[:, :t + 1], cache=cache)[:, -1])
    full = ours(ids, mask)
    for t, step in zip(range(prompt - 1, 16), steps):
        real = mask[:, t].bool()  # outputs at pad positions are meaningless
        torch.testing.assert_close(step[real], full[real, t])
    assert cache.length == 16


def test_left_padding_does_not_change_rows(pair):
    _, ours = pair
    ids, mask = left_padded([5, 9, 3])
    batch = ours(ids, mask)
    batch_tokens = ours.generate(ids, mask, max_new_tokens=6, eos_token_id=[], pad_token_id=PAD)[:, -6:]
    for i in range(3):
        row = ids[i][mask[i].bool()][None]
        torch.testing.assert_close(ours(row)[0], batch[i][mask[i].bool()])
        alone = ours.generate(row, max_new_tokens=6, eos_token_id=[])[:, -6:]
        assert torch.equal(alone[0], batch_tokens[i])


def test_sequence_classification_matches_hf():
    torch.manual_seed(0)
    hf = tf.GPT2ForSequenceClassification(hf_config(num_labels=3, pad_token_id=PAD)).eval()
    ours = from_hf(hf, gpt.GPTForSequenceClassification)
    assert ours.config.num_labels == 3
    ids, mask = left_padded([9, 5, 7])
    ids, mask = ids.flip(1), mask.flip(1)  # right-padded with pad_token_id
    expected = hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours(ids, mask), expected)
    torch.testing.assert_close(ours(ids), expected)  # no mask: found by pad_token_id
    left, left_mask = left_padded([9, 5, 7])  # left padding: same scores as each row alone
    for i, scores in enumerate(ours(left, left_mask)):
        torch.testing.assert_close(scores, ours(left[i][left_mask[i].bool()][None])[0])
    state = gpt.to_hf_state_dict(ours.state_dict(), ours.config)
    assert set(state) == set(hf.state_dict())


def test_dropout_only_in_training():
    cfg = gpt.GPTConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, max_len=32, dropout=0.3,
                        attention_dropout=0.3)
    model = gpt.GPTForCausalLM(cfg)
    no_dropout = gpt.GPTForCausalLM(gpt.GPTConfig(**{**vars(cfg), "dropout": 0.0, "attention_dropout": 0.0}))
    no_dropout.load_state_dict(model.state_dict())
    ids = torch.randint(0, V, (2, 10))
    model.train()
    assert not torch.allclose(model(ids), model(ids))
    model.eval()
    torch.testing.assert_close(model(ids), no_dropout.eval()(ids))
    assert not model.training and not any(m.training for m in model.modules())


@pytest.mark.parametrize("where", ["embeddings", "residual", "attention"])
def test_each_dropout_is_applied(where):
    """Each of the three dropouts, alone, makes training-mode outputs random."""
    p = {"embeddings": (0.3, 0.0), "residual": (0.3, 0.0), "attention": (0.0, 0.3)}[where]
    cfg = gpt.GPTConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, max_len=32, dropout=p[0],
                        attention_dropout=p[1])
    model = gpt.GPT(cfg).train()
    if where == "embeddings":
        model.layers = torch.nn.ModuleList()  # embeddings -> dropout -> final norm
        run = lambda: model(torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(0)))
    else:
        x = torch.randn(2, 10, 32)
        run = lambda: model.layers[0](x, None, True)
    assert not torch.allclose(run(), run())
    model.eval()
    torch.testing.assert_close(run(), run())


def test_init_scales_residual_projections():
    cfg = gpt.GPTConfig(vocab_size=V, dim=256, n_layers=8, n_heads=4, max_len=32)
    model = gpt.GPTForCausalLM(cfg)
    block = model.model.layers[0]
    residual_std = 0.02 / (2 * 8) ** 0.5
    assert abs(block.attn.o_proj.weight.std() / residual_std - 1) < 0.05
    assert abs(block.mlp.down_proj.weight.std() / residual_std - 1) < 0.05
    assert abs(block.attn.q_proj.weight.std() / 0.02 - 1) < 0.05
    assert block.attn.q_proj.bias.abs().sum() == 0 and torch.equal(block.attn_norm.weight, torch.ones(256))


@pytest.mark.parametrize("name", list(gpt.PRESETS))
def test_presets_build(name):
    cfg = gpt.PRESETS[name]
    assert gpt.GPTConfig.from_hf(cfg.to_hf()) == cfg
    with torch.device("meta"):  # no memory, no init time: only shapes
        model = gpt.GPTForCausalLM(cfg)
    assert model.lm_head.weight.shape == (cfg.vocab_size, cfg.dim)
    if name == "gpt2":
        assert sum(p.numel() for p in model.parameters()) == 124_439_808  # GPT-2 small
    if name in ("gpt-tiny", "gpt-char-cpu"):
        logits = gpt.GPTForCausalLM(cfg)(torch.zeros(2, 8, dtype=torch.long))
        assert logits.shape == (2, 8, cfg.vocab_size) and logits.isfinite().all()


def test_config_round_trip_through_transformers():
    cfg = gpt.GPTConfig(vocab_size=V, dim=48, n_layers=3, n_heads=6, hidden_dim=100, max_len=40, dropout=0.2,
                        attention_dropout=0.05, act="relu", pad_token_id=PAD, tie_embeddings=False,
                        num_labels=5)
    hf_cfg = tf.AutoConfig.for_model(**cfg.to_hf())
    assert isinstance(hf_cfg, tf.GPT2Config) and hf_cfg.num_labels == 5
    assert gpt.GPTConfig.from_hf(hf_cfg.to_dict()) == cfg
    gpt2 = gpt.GPTConfig(dropout=0.1, attention_dropout=0.1)  # transformers' defaults: the 124M model
    assert gpt.GPTConfig.from_hf(tf.GPT2Config().to_dict()) == gpt2
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt.GPTConfig.from_hf({**cfg.to_hf(), "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ValueError, match="n_heads"):
        gpt.GPTConfig(dim=30, n_heads=4)


def test_positions_beyond_context_raise(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="context length"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="context length"):
        ours.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(pair):
    _, ours = pair
    ids, mask = left_padded([6, 9, 3])
    kw = {"max_new_tokens": 12, "eos_token_id": [], "pad_token_id": PAD}
    first = ours.generate(ids, mask, do_sample=True, seed=7, **kw)
    assert torch.equal(ours.generate(ids, mask, do_sample=True, seed=7, **kw), first)
    assert not torch.equal(ours.generate(ids, mask, do_sample=True, seed=8, **kw), first)
    greedy = ours.generate(ids, mask, **kw)
    assert torch.equal(ours.generate(ids, mask, do_sample=True, top_k=1, seed=3, **kw), greedy)


def test_eos_stops_a_row_and_pads_after(pair):
    _, ours = pair
    ids, mask = left_padded([6, 9, 3])
    N, T = 12, ids.shape[1]
    greedy = ours.generate(ids, mask, max_new_tokens=N, eos_token_id=[])[:, T:]
    eos = int(greedy[0, 2])  # row 0 emits it at step 2
    out = ours.generate(ids, mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD)[:, T:]
    ends = [(row == eos).nonzero()[0].item() + 1 if (row == eos).any() else N for row in greedy]
    assert ends[0] <= 3 and out.shape[1] == max(ends)
    for row, end in enumerate(ends):
        assert torch.equal(out[row, :end], greedy[row, :end])
        assert (out[row, end:] == PAD).all()
