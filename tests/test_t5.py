"""T5 family: parity with transformers, weight conversion both ways, relative position buckets,
KV cache, greedy and beam-search generation, dropout, presets and config round trip."""

import json

import pytest
import torch

from lmforge.models import t5

tf = pytest.importorskip("transformers")

V, PAD, EOS = 99, 0, 1
TIED_ALIASES = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}  # transformers' copies of shared


def hf_config(**kw):
    base = {"vocab_size": V, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
            "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20,
            "decoder_start_token_id": PAD, "pad_token_id": PAD, "eos_token_id": EOS}
    return tf.T5Config(**{**base, **kw})


def hf_model(seed=0, tie=True, **kw):
    """A random transformers T5; untied means a head of its own, as Flan-T5 checkpoints load
    (transformers >= 5 ties a freshly built head even with tie_word_embeddings=False)."""
    torch.manual_seed(seed)
    hf = tf.T5ForConditionalGeneration(hf_config(tie_word_embeddings=tie, **kw)).eval()
    if not tie:
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(V, hf.config.d_model))
    return hf


def from_hf(hf, cls=t5.T5ForConditionalGeneration):
    cfg = t5.T5Config.from_hf(hf.config.to_dict())
    ours = cls(cfg).eval()
    ours.load_state_dict(t5.from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    return ours


def padded(lengths, total, left, seed):
    """Random token ids (B, total) padded on the left or right, and the mask (B, total)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), total), PAD)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        span = slice(total - n, total) if left else slice(0, n)
        ids[i, span] = torch.randint(2, V, (n,), generator=g)
        mask[i, span] = 1
    return ids, mask


def batch():
    """Encoder batch: one full row, one right-padded, one left-padded; decoder batch right-padded."""
    ids, mask = padded([24, 15, 24], 24, left=False, seed=1)
    ids[2], mask[2] = ids[2].roll(6), mask[2].roll(6)  # left-pad the last row instead
    ids[2, :6], mask[2, :6] = PAD, 0
    dec, dec_mask = padded([17, 17, 9], 17, left=False, seed=2)
    dec[:, 0] = PAD  # decoder_start
    return ids, mask, dec, dec_mask


@pytest.fixture(scope="module")
def pair():
    hf = hf_model(feed_forward_proj="gated-gelu", tie=False)
    return hf, from_hf(hf)


@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_hf(ffn, tie):
    hf = hf_model(feed_forward_proj=ffn, tie=tie, num_decoder_layers=3)
    ours = from_hf(hf)
    assert ours.config.tie_embeddings == tie and ours.config.n_decoder_layers == 3
    assert (ours.lm_head.weight is ours.embed.weight) == tie
    ids, mask, dec, dec_mask = batch()
    expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
    real = dec_mask.bool()
    torch.testing.assert_close(ours(ids, mask, dec, dec_mask)[real], expected[real])
    torch.testing.assert_close(ours(ids, decoder_input_ids=dec), hf(input_ids=ids, decoder_input_ids=dec).logits)
    encoder_real = mask.bool()
    torch.testing.assert_close(ours.encode(ids, mask)[encoder_real],
                               hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[encoder_real])


@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
@pytest.mark.parametrize("tie", [True, False])
def test_weights_round_trip_to_hf(ffn, tie):
    hf = hf_model(feed_forward_proj=ffn, tie=tie)
    ours = from_hf(hf)
    state = t5.to_hf_state_dict(ours.state_dict(), ours.config)
    assert ("lm_head.weight" in state) != tie  # a tied head is left out, as transformers saves it
    back = tf.T5ForConditionalGeneration(tf.AutoConfig.for_model(**ours.config.to_hf())).eval()
    if not tie:
        back.lm_head.weight = torch.nn.Parameter(torch.empty(V, 32))  # see hf_model
    tied = {k: state["shared.weight"] for k in TIED_ALIASES | ({"lm_head.weight"} if tie else set())}
    assert set(state) | set(tied) == set(back.state_dict())
    back.load_state_dict({**tied, **state}, strict=True)
    ids, mask, dec, _ = batch()
    torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                               hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)


@pytest.mark.parametrize("tie", [True, False])
def test_hf_from_pretrained_reads_our_folder(tmp_path, tie):
    """Our config.json + converted safetensors open in transformers with nothing missing or unused."""
    from safetensors.torch import save_file

    hf = hf_model(feed_forward_proj="gated-gelu", tie=tie)
    ours = from_hf(hf)
    state = t5.to_hf_state_dict(ours.state_dict(), ours.config)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    hf_cfg = {**ours.config.to_hf(), "architectures": ["T5ForConditionalGeneration"]}
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    loaded, info = tf.T5ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask, dec, _ = batch()
    torch.testing.assert_close(loaded.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                               hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)


@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
def test_our_saved_weights_load_back(ffn):
    """from_hf_state_dict reads what transformers writes: shared.weight only, tied copies absent."""
    for tie in (True, False):
        cfg = t5.T5Config(vocab_size=V, dim=32, kv_dim=8, hidden_dim=64, n_layers=2, n_heads=4, ffn=ffn,
                          tie_embeddings=tie)
        model = t5.T5ForConditionalGeneration(cfg)
        state = t5.from_hf_state_dict(t5.to_hf_state_dict(model.state_dict(), cfg), cfg)
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_legacy_checkpoint_names(pair):
    """Older checkpoints: the embedding only under a tied name, an unused cross-attention bias."""
    hf, ours = pair
    state = dict(hf.state_dict())
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    model = t5.T5ForConditionalGeneration(ours.config).eval()
    model.load_state_dict(t5.from_hf_state_dict(state, ours.config), strict=True)
    ids, mask, dec, _ = batch()
    torch.testing.assert_close(model(ids, mask, dec), ours(ids, mask, dec))


def test_encoder_model_matches_hf():
    torch.manual_seed(0)
    hf = tf.T5EncoderModel(hf_config(feed_forward_proj="gated-gelu")).eval()
    ours = from_hf(hf, t5.T5EncoderModel)
    ids, mask, _, _ = batch()
    real = mask.bool()
    torch.testing.assert_close(ours(ids, mask)[real], hf(input_ids=ids, attention_mask=mask).last_hidden_state[real])
    state = t5.to_hf_state_dict(ours.state_dict(), ours.config)
    assert set(state) | {"encoder.embed_tokens.weight"} == set(hf.state_dict())
    # the encoder of a full checkpoint: decoder weights and head are simply not used
    full = t5.from_hf_state_dict(hf_model(feed_forward_proj="gated-gelu").state_dict(), ours.config)
    result = ours.load_state_dict(full, strict=False)
    assert not result.missing_keys and all(k.startswith(("decoder.", "lm_head.")) for k in result.unexpected_keys)


def test_relative_position_bucket_matches_hf():
    bucket = tf.models.t5.modeling_t5.T5Attention._relative_position_bucket
    relative = torch.arange(-300, 300)[None, :] - torch.arange(0, 40)[:, None]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20), (16, 64)):
            expected = bucket(relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
            got = t5.relative_position_bucket(relative, bidirectional, buckets, distance)
            assert torch.equal(got, expected), (bidirectional, buckets, distance)
            assert int(got.max()) == buckets - 1  # the far buckets are reached


def test_shift_right_matches_hf(pair):
    hf, _ = pair
    labels = torch.tensor([[5, 6, 7, EOS], [8, EOS, -100, -100]])
    assert torch.equal(t5.shift_right(labels, PAD, PAD), hf._shift_right(labels))
    with pytest.raises(ValueError, match="shift_right"):
        pair[1](labels)


def test_kv_cache_decoding_equals_full_decoder(pair):
    _, ours = pair
    ids, mask, dec, _ = batch()
    with torch.no_grad():
        enc = ours.encode(ids, mask)
        full = ours.decode(dec, enc, mask)
        cache = ours.new_cache(dec.shape[0], dec.shape[1])
        steps = [ours.decode(dec[:, :5], enc, mask, cache=cache)]  # a chunk, then token by token
        steps += [ours.decode(dec[:, t:t + 1], enc, mask, cache=cache) for t in range(5, dec.shape[1])]
    assert cache.length == dec.shape[1] and all(c.kv is not None for c in cache.cross)
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_greedy_generation_matches_hf(pair):
    hf, ours = pair
    ids, mask, _, _ = batch()
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got = ours.generate(ids, mask, max_new_tokens=10)
    assert got.tolist() == expected.tolist()
    assert (got[:, 0] == PAD).all()  # decoder ids start with decoder_start
    # EOS in play: a token the model produces early ends one row while the others go on (padded)
    eos = int(got[0, 3])
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    got = ours.generate(ids, mask, max_new_tokens=10, eos_token_id=eos)
    assert got.tolist() == expected.tolist()
    assert (got == eos).any() and (got[:, 1:] == PAD).any()
    streamed = torch.stack(list(ours.stream(ids, mask, max_new_tokens=10, eos_token_id=eos)), 1)
    assert torch.equal(streamed, got[:, 1:])


def _until_eos(row, eos):
    """The tokens up to and including the first EOS after the start token."""
    row = row.tolist()
    return row[: row.index(eos, 1) + 1] if eos in row[1:] else row


@pytest.mark.parametrize("tie", [True, False])
def test_beam_search_matches_hf(tie):
    hf = hf_model(seed=3, feed_forward_proj="gated-gelu", tie=tie)
    ours = from_hf(hf)
    ids, mask, _, _ = batch()
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
    assert ours.generate(ids, mask, max_new_tokens=8, num_beams=3).tolist() == expected.tolist()


@pytest.mark.parametrize("step", [1, 3])
def test_beam_search_with_eos_matches_hf(step):
    """EOS = a token the best beam produces at `step`: hypotheses end early (at step 1: all of them)."""
    hf = hf_model(seed=3, feed_forward_proj="gated-gelu", tie=False)
    ours = from_hf(hf)
    ids, mask, _, _ = batch()
    eos = int(ours.generate(ids, mask, max_new_tokens=8, num_beams=3)[0, step])
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, eos_token_id=eos)
    got = ours.generate(ids, mask, max_new_tokens=8, num_beams=3, eos_token_id=eos)
    assert got.shape == expected.shape
    assert [_until_eos(r, eos) for r in got] == [_until_eos(r, eos) for r in expected]
    ended = [len(_until_eos(r, eos)) for r in got]
    assert min(ended) < 9, "no hypothesis ended at EOS: the test does not exercise it"
    # after EOS, transformers' beam search fills with `pad_token_id or eos` (a pad id of 0 is falsy there);
    # we fill with the pad token, as its greedy search does
    for row, n in zip(got, ended):
        assert (row[n:] == PAD).all()


@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
def test_init_matches_transformers(ffn):
    """Same init scale per weight as transformers (std within 10% on weights of >= 1000 values)."""
    cfg = t5.T5Config(vocab_size=256, dim=128, kv_dim=16, hidden_dim=256, n_layers=1, n_heads=4, ffn=ffn,
                      tie_embeddings=False)
    torch.manual_seed(0)
    state = t5.to_hf_state_dict(t5.T5ForConditionalGeneration(cfg).state_dict(), cfg)
    hf = tf.T5ForConditionalGeneration(tf.AutoConfig.for_model(**cfg.to_hf())).state_dict()
    for k, v in state.items():
        if v.numel() >= 1000:
            assert abs(float(v.std() / hf[k].std()) - 1) < 0.1, k
        else:
            assert torch.equal(v, hf[k]) or "relative_attention_bias" in k, k  # norms: ones


def test_dropout_only_in_training():
    torch.manual_seed(0)
    cfg = t5.T5Config(vocab_size=V, dim=32, kv_dim=8, hidden_dim=64, n_layers=2, n_heads=4, dropout=0.1)
    model = t5.T5ForConditionalGeneration(cfg)
    ids, mask, dec, dec_mask = batch()
    model.train()
    assert not torch.allclose(model(ids, mask, dec, dec_mask), model(ids, mask, dec, dec_mask))
    model.eval()
    torch.testing.assert_close(model(ids, mask, dec, dec_mask), model(ids, mask, dec, dec_mask), rtol=0, atol=0)
    model.train()
    model.generate(ids, mask, max_new_tokens=2)
    assert model.training  # generate restores the mode
    assert all(layer.attn.dropout == 0.1 for layer in model.decoder.layers)


@pytest.mark.parametrize("name", list(t5.PRESETS))
def test_presets_build_with_transformers_shapes(name):
    """Every preset builds (on the meta device: no memory) with the parameter shapes transformers has."""
    cfg = t5.PRESETS[name]
    with torch.device("meta"):
        ours = t5.T5ForConditionalGeneration(cfg)
        hf = tf.T5ForConditionalGeneration(tf.AutoConfig.for_model(**cfg.to_hf()))
    state = t5.to_hf_state_dict(ours.state_dict(), cfg)
    hf_state = hf.state_dict()
    assert set(state) <= set(hf_state) and set(hf_state) - set(state) <= TIED_ALIASES | {"lm_head.weight"}
    assert all(state[k].shape == hf_state[k].shape for k in state)


def test_known_parameter_counts():
    with torch.device("meta"):
        small = t5.T5ForConditionalGeneration(t5.PRESETS["t5-small"])
        flan = t5.T5ForConditionalGeneration(t5.PRESETS["flan-t5-small"])
    assert sum(p.numel() for p in small.parameters()) == 60_506_624  # google-t5/t5-small
    assert sum(p.numel() for p in flan.parameters()) == 76_961_152  # google/flan-t5-small


@pytest.mark.parametrize("name", list(t5.PRESETS))
def test_config_round_trip(name):
    cfg = t5.PRESETS[name]
    assert t5.T5Config.from_hf(cfg.to_hf()) == cfg
    hf = tf.AutoConfig.for_model(**cfg.to_hf())
    assert isinstance(hf, tf.T5Config)
    assert t5.T5Config.from_hf(hf.to_dict()) == cfg  # transformers reads it the same way (untied included)
    assert hf.scale_decoder_outputs == cfg.tie_embeddings


def test_config_errors_and_defaults():
    with pytest.raises(ValueError, match="gated-gelu"):
        t5.T5Config(ffn="swiglu")
    cfg = t5.T5Config.from_hf({"model_type": "t5", "vocab_size": 10, "d_model": 8, "d_kv": 4, "d_ff": 16,
                               "num_layers": 1, "num_heads": 2, "tie_word_embeddings": False})
    assert cfg.n_decoder_layers == 1 and not cfg.tie_embeddings and cfg.decoder_start_token_id == 0
    assert not hasattr(cfg, "max_len")  # relative positions: no context limit for generate to check
