"""BERT encoder and its heads: masked LM, next-sentence prediction, sequence / token classification, span QA.

Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding"
(arXiv:1810.04805). Post-norm layers, learned positions, token types, a tanh pooler on [CLS].
Also loads MiniLM / sentence-transformers checkpoints with the same layout (`mean_pool` gives their
sentence embeddings).

    BertModel                    input_ids -> hidden (B, T, C); .pooled(hidden) -> (B, C)
    BertForMaskedLM              -> logits (B, T, V)
    BertForPreTraining           -> (mlm logits (B, T, V), nsp logits (B, 2))
    BertForNextSentencePrediction-> nsp logits (B, 2)
    BertForSequenceClassification-> (B, num_labels)
    BertForTokenClassification   -> (B, T, num_labels)
    BertForQuestionAnswering     -> (start logits (B, T), end logits (B, T))

Loading weights across architectures: `from_hf_state_dict` always returns the head models' layout
(encoder weights under `bert.`, as transformers' head checkpoints have them), whatever checkpoint it
was given. A head model therefore loads a bare-encoder checkpoint directly (its head stays freshly
initialised: missing keys), and `BertModel` strips a leading `bert.` when loading (a load_state_dict
pre-hook), so a bare encoder loads any head checkpoint (the head weights come back as unexpected keys).

Shapes: B batch, T time, C channels, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, build_mask
from .dropout import Dropout
from .linear import Linear, linear
from .recompute import call_layer
from .statedict import rename

ACTIVATIONS = {  # transformers' `hidden_act` names
    "gelu": F.gelu,  # exact erf GELU
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072  # MLP inner width
    max_len: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    dropout: float = 0.1  # hidden dropout (embeddings, after attention and MLP)
    attention_dropout: float = 0.1  # on attention probabilities
    classifier_dropout: float | None = None  # before the classifier; None = `dropout`
    act: str = "gelu"
    pad_token_id: int | None = 0
    init_std: float = 0.02
    tie_embeddings: bool = True  # MLM decoder shares the word embedding
    num_labels: int = 2
    id2label: dict[int, str] | None = None  # label names of a classifier; None = LABEL_0, LABEL_1, ...

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"activation {self.act!r} is not supported; choose one of: {', '.join(ACTIVATIONS)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            if len(self.id2label) != self.num_labels:
                raise ValueError(f"num_labels is {self.num_labels} but id2label names {len(self.id2label)} "
                                 f"labels ({self.id2label}); make them agree or leave id2label out")

    @property
    def label2id(self) -> dict[str, int] | None:
        return None if self.id2label is None else {v: k for k, v in self.id2label.items()}

    @classmethod
    def from_hf(cls, hf: dict) -> BertConfig:
        """Read a transformers `config.json` dict (model_type bert)."""
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported; "
                             "supported: 'absolute'")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
        return cls(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], hidden_dim=hf["intermediate_size"],
            max_len=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
            norm_eps=hf.get("layer_norm_eps", 1e-12), dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            classifier_dropout=hf.get("classifier_dropout"), act=hf.get("hidden_act", "gelu"),
            pad_token_id=hf.get("pad_token_id", 0), init_std=hf.get("initializer_range", 0.02),
            tie_embeddings=hf.get("tie_word_embeddings", True), **_labels(hf))

    def to_hf(self) -> dict:
        """A transformers `config.json` dict."""
        labels = {} if self.id2label is None else {"id2label": self.id2label, "label2id": self.label2id}
        return {
            "model_type": "bert", "vocab_size": self.vocab_size, "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "intermediate_size": self.hidden_dim, "max_position_embeddings": self.max_len,
            "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.norm_eps,
            "hidden_dropout_prob": self.dropout, "attention_probs_dropout_prob": self.attention_dropout,
            "classifier_dropout": self.classifier_dropout, "hidden_act": self.act,
            "pad_token_id": self.pad_token_id, "initializer_range": self.init_std,
            "tie_word_embeddings": self.tie_embeddings, "position_embedding_type": "absolute",
            "num_labels": self.num_labels, **labels}


def _labels(hf: dict) -> dict:
    """num_labels and id2label of a config dict. transformers' placeholder names (LABEL_0, ...) are
    dropped, so an explicit `num_labels` (a new classifier on a checkpoint) wins over them."""
    id2label = {int(k): v for k, v in (hf.get("id2label") or {}).items()} or None
    num_labels = hf.get("num_labels", len(id2label) if id2label else 2)
    if id2label == {i: f"LABEL_{i}" for i in range(len(id2label or ()))}:
        id2label = None
    return {"num_labels": num_labels, "id2label": id2label}


PRESETS = {  # Google's compact BERTs (Turc et al. 2019) and the classic sizes, uncased WordPiece vocab
    "bert-tiny": BertConfig(dim=128, n_layers=2, n_heads=2, hidden_dim=512),
    "bert-mini": BertConfig(dim=256, n_layers=4, n_heads=4, hidden_dim=1024),
    "bert-small": BertConfig(dim=512, n_layers=4, n_heads=8, hidden_dim=2048),
    "bert-medium": BertConfig(dim=512, n_layers=8, n_heads=8, hidden_dim=2048),
    "bert-base": BertConfig(),
    "bert-large": BertConfig(dim=1024, n_layers=24, n_heads=16, hidden_dim=4096),
    "all-minilm-l6-v2": BertConfig(dim=384, n_layers=6, n_heads=12, hidden_dim=1536),
}


def init_weights(module: nn.Module, std: float) -> None:
    """transformers' BERT init: normal(std) weights, zero biases and padding row, LayerNorm ones/zeros."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: the mean over real tokens.

    Args:
        hidden: (B, T, C) hidden states; attention_mask: (B, T), 1 = token, 0 = padding.
    Returns:
        (B, C)
    """
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class Embeddings(nn.Module):
    """word + token type + position embeddings, then LayerNorm and dropout."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.dim, padding_idx=c.pad_token_id)
        self.position = nn.Embedding(c.max_len, c.dim)
        self.token_type = nn.Embedding(c.type_vocab_size, c.dim)
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.dropout = Dropout(c.dropout)

    def forward(self, input_ids, token_type_ids, position_ids):  # (B, T) each -> (B, T, C)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(position_ids)
        return self.dropout(self.norm(x))


class MLP(nn.Module):
    """down(act(up(x)))."""

    def __init__(self, dim: int, hidden_dim: int, act: str):
        super().__init__()
        self.up_proj = Linear(dim, hidden_dim)
        self.down_proj = Linear(hidden_dim, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class Layer(nn.Module):
    """Post-norm encoder layer: x = norm(x + attn(x)); x = norm(x + mlp(x))."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.attn = Attention(c.dim, c.n_heads, bias=True, dropout=c.attention_dropout)
        self.attn_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.mlp = MLP(c.dim, c.hidden_dim, c.act)
        self.mlp_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.dropout = Dropout(c.dropout)

    def forward(self, x, mask, prefix=None):  # x: (B, T, C)
        x = self.attn_norm(x + self.dropout(self.attn(x, mask, prefix=prefix)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class BertModel(nn.Module):
    """The bare encoder: token ids -> hidden states (B, T, C); `pooled(hidden)` -> (B, C).

    Args:
        pooler: build the [CLS] pooler (transformers leaves it out of the MLM, token-classification
            and QA models).
    """

    def __init__(self, config: BertConfig, pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.n_layers))
        self.pooler = Linear(config.dim, config.dim) if pooler else None
        init_weights(self, config.init_std)
        self.register_load_state_dict_pre_hook(_strip_bert_prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                prefix: list | None = None) -> torch.Tensor:
        """input_ids, attention_mask (1 = token, 0 = padding), token_type_ids, position_ids: (B, T).
        `prefix`: per-layer prefix keys/values (prefix tuning). Returns (B, T, C)."""
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]  # (1, T), as transformers does
        if int(position_ids.max()) >= self.config.max_len:
            raise ValueError(f"sequence of {int(position_ids.max()) + 1} positions exceeds the maximum "
                             f"length of this model ({self.config.max_len}); truncate the input")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        mask, _ = build_mask(attention_mask, T, causal=False)
        for i, layer in enumerate(self.layers):
            x = call_layer(self, layer, x, mask, prefix[i] if prefix is not None else None)
        return x

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, C): tanh(dense(hidden state of the first token, [CLS]))."""
        if self.pooler is None:
            raise ValueError("this BertModel was built without a pooler (pooler=False)")
        return torch.tanh(self.pooler(hidden[:, 0]))


def _strip_bert_prefix(module, state, prefix, *args) -> None:
    """load_state_dict pre-hook: a bare encoder takes head-model weights ("bert.x" -> "x")."""
    head = prefix + "bert."
    for key in [k for k in state if k.startswith(head)]:
        state[prefix + key[len(head):]] = state.pop(key)


class MLMHead(nn.Module):
    """hidden (B, T, C) -> vocabulary logits (B, T, V): dense + act + LayerNorm, then the decoder
    (its weight tied to the word embedding) plus a bias."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = Linear(c.dim, c.dim)
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.decoder = Linear(c.dim, c.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.act = ACTIVATIONS[c.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.norm(self.act(self.dense(x))), self.decoder.weight, self.bias)


def _at(hidden: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
    """hidden (B, T, C) -> (N, C) at the N positions where `masked` (B, T) is True; all without it."""
    return hidden if masked is None else hidden[masked]


class _BertWithHead(nn.Module):
    """Base of the head models: `self.bert` (the encoder) and head modules initialised like transformers."""

    def __init__(self, config: BertConfig, pooler: bool):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, pooler=pooler)

    def _init_head(self) -> None:
        for name, module in self.named_children():
            if name != "bert":
                init_weights(module, self.config.init_std)

    def tie_weights(self) -> None:
        """Share the word embedding with the MLM decoder when the config says so."""
        if self.config.tie_embeddings and hasattr(self, "mlm"):
            self.mlm.decoder.weight = self.bert.embeddings.word.weight


class BertForMaskedLM(_BertWithHead):
    """BERT with its masked-LM head: -> logits (B, T, V)."""

    def __init__(self, config: BertConfig):
        super().__init__(config, pooler=False)
        self.mlm = MLMHead(config)
        self._init_head()
        self.tie_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, prefix=None,
                masked=None):
        """`masked` (B, T) bool: logits only at those positions, (N, V) in row-major order (training
        needs no others, and the vocabulary projection is most of a small BERT's work)."""
        return self.mlm(_at(self.bert(input_ids, attention_mask, token_type_ids, position_ids, prefix), masked))


class BertForPreTraining(_BertWithHead):
    """BERT's pretraining heads: -> (masked-LM logits (B, T, V), next-sentence logits (B, 2))."""

    def __init__(self, config: BertConfig):
        super().__init__(config, pooler=True)
        self.mlm = MLMHead(config)
        self.nsp = Linear(config.dim, 2)
        self._init_head()
        self.tie_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, prefix=None,
                masked=None):
        """`masked` (B, T) bool: MLM logits only at those positions, (N, V), as BertForMaskedLM."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids, position_ids, prefix)
        return self.mlm(_at(hidden, masked)), self.nsp(self.bert.pooled(hidden))


class BertForNextSentencePrediction(_BertWithHead):
    """Is segment B the continuation of segment A: -> logits (B, 2), index 0 = "is next"."""

    def __init__(self, config: BertConfig):
        super().__init__(config, pooler=True)
        self.nsp = Linear(config.dim, 2)
        self._init_head()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, prefix=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids, position_ids, prefix)
        return self.nsp(self.bert.pooled(hidden))


def _classifier_dropout(c: BertConfig) -> Dropout:
    return Dropout(c.dropout if c.classifier_dropout is None else c.classifier_dropout)


class BertForSequenceClassification(_BertWithHead):
    """pooled [CLS] -> dropout -> linear: -> logits (B, num_labels)."""

    def __init__(self, config: BertConfig):
        super().__init__(config, pooler=True)
        self.dropout = _classifier_dropout(config)
        self.classifier = Linear(config.dim, config.num_labels)
        self._init_head()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, prefix=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids, position_ids, prefix)
        return self.classifier(self.dropout(self.bert.pooled(hidden)))


class BertForTokenClassification(_BertWithHead):
    """every hidden state -> dropout -> linear: -> logits (B, T, num_labels)."""

    def __init__(self, config: BertConfig):
        super().__init__(config, pooler=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = Linear(config.dim, config.num_labels)
        self._init_head()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, prefix=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids, position_ids, prefix)
        return self.classifier(self.dropout(hidden))


class BertForQuestionAnswering(_BertWithHead):
    """Extractive QA: -> (start logits (B, T), end logits (B, T)) of the answer span."""

    def __init__(self, config: BertConfig):
        super().__init__(config, pooler=False)
        self.qa_outputs = Linear(config.dim, 2)
        self._init_head()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, prefix=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids, position_ids, prefix)
        start, end = self.qa_outputs(hidden).unbind(-1)  # (B, T, 2) -> 2 x (B, T)
        return start, end


ARCHITECTURES = {
    "BertModel": BertModel,
    "BertForMaskedLM": BertForMaskedLM,
    "BertForPreTraining": BertForPreTraining,
    "BertForNextSentencePrediction": BertForNextSentencePrediction,
    "BertForSequenceClassification": BertForSequenceClassification,
    "BertForTokenClassification": BertForTokenClassification,
    "BertForQuestionAnswering": BertForQuestionAnswering,
}

# (HF name part, our name part). Our parts never overlap, so the list also runs backwards (ours -> HF).
HF_RENAMES = [
    (".word_embeddings.", ".word."), (".position_embeddings.", ".position."),
    (".token_type_embeddings.", ".token_type."), (".embeddings.LayerNorm.", ".embeddings.norm."),
    (".encoder.layer.", ".layers."),
    (".attention.self.query.", ".attn.q_proj."), (".attention.self.key.", ".attn.k_proj."),
    (".attention.self.value.", ".attn.v_proj."), (".attention.output.dense.", ".attn.o_proj."),
    (".attention.output.LayerNorm.", ".attn_norm."),
    (".intermediate.dense.", ".mlp.up_proj."), (".output.dense.", ".mlp.down_proj."),
    (".output.LayerNorm.", ".mlp_norm."), (".pooler.dense.", ".pooler."),
    (".cls.predictions.transform.dense.", ".mlm.dense."), (".cls.predictions.transform.LayerNorm.", ".mlm.norm."),
    (".cls.predictions.decoder.", ".mlm.decoder."), (".cls.predictions.bias", ".mlm.bias"),
    (".cls.seq_relationship.", ".nsp."),
]
_ENCODER = ("embeddings", "encoder", "pooler")  # top-level names of a bare transformers BertModel
_BUFFERS = ("position_ids", "token_type_ids")  # transformers' non-persistent buffers (old files saved them)


def from_hf_state_dict(state: dict, config: BertConfig) -> dict:
    """transformers BERT weights (any architecture, with or without `bert.`) -> ours, in the head
    models' layout: encoder weights under `bert.` (a bare `BertModel` strips it when loading)."""
    out = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in _BUFFERS:
            continue
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out["bert." + key if key.split(".", 1)[0] in _ENCODER else key] = value
    out = rename(out, HF_RENAMES)
    if "mlm.decoder.bias" in out:  # transformers ties it to cls.predictions.bias
        out.setdefault("mlm.bias", out.pop("mlm.decoder.bias"))
    if config.tie_embeddings and "mlm.bias" in out:  # tied decoder weight, often not saved
        out["mlm.decoder.weight"] = out["bert.embeddings.word.weight"]
    return out


def to_hf_state_dict(state: dict, config: BertConfig) -> dict:
    """Our weights -> transformers names, keeping the prefix layout (bare BertModel without `bert.`).
    The tied decoder weight is left out, as transformers saves it."""
    state = {k: v for k, v in state.items() if not (config.tie_embeddings and k == "mlm.decoder.weight")}
    return rename(state, HF_RENAMES, to_hf=True)
