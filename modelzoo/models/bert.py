"""BERT for masked-codon modelling, and a sequence classifier on the pooled [CLS] codon.

As the original BERT: learned positions plus a token-type embedding, LayerNorm after each
residual sum (post-LN), exact-erf GELU, bidirectional attention that ignores [PAD] keys. The MLM
head's decoder is the token embedding (one tied Parameter shared by the first and last stage).
``model.num_labels`` turns the head into a classifier (tanh pooler on [CLS], then a linear layer);
its backbone loads from an MLM checkpoint (``--load_checkpoint_states model``).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from modelzoo.config import ModelConfig
from modelzoo.models.base import StagedModel, init_weights, token_loss
from modelzoo.models.layers import MLP, Attention, token_positions
from modelzoo.models.spec import SAME, MASKED_LM, SPLIT_QKV, HFTwin, ModelSpec, linear, norm

TYPE_VOCAB_SIZE = 2  # BERT's sentence A / sentence B; a codon sequence is all type 0


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_types = nn.Embedding(TYPE_VOCAB_SIZE, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, hidden, batch):
        ids = batch["input_ids"]
        types = batch.get("token_type_ids")
        positions = self.positions(token_positions(batch, ids.shape[1], ids.device))
        kinds = self.token_types.weight[0] if types is None else self.token_types(types)
        return self.dropout(self.norm(self.tokens(ids) + positions + kinds))


class BertBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention.from_config(cfg, bias=True, causal=False)
        self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_size, dropout=cfg.dropout_rate, approximate_gelu=False)
        self.ln_mlp = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)

    def forward(self, hidden, batch):
        hidden = self.ln_attn(hidden + self.attn(hidden, batch))
        return self.ln_mlp(hidden + self.mlp(hidden))


class BertMLMHead(nn.Module):
    """Transform (dense, GELU, LayerNorm), then logits through the tied token embedding."""

    def __init__(self, cfg: ModelConfig, tokens: nn.Embedding):
        super().__init__()
        self.transform = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.tokens = tokens
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden, batch):
        hidden = self.norm(F.gelu(self.transform(hidden)))
        return token_loss(hidden @ self.tokens.weight.t() + self.bias, batch.get("labels"))


class BertClassifierHead(nn.Module):
    """tanh pooler on the [CLS] position, dropout, linear classifier; labels are one per sequence."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, hidden, batch):
        pooled = torch.tanh(self.pooler(hidden[:, 0]))
        return token_loss(self.classifier(self.dropout(pooled)), batch.get("labels"))


class BertModel(StagedModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.blocks = nn.ModuleList(BertBlock(cfg) for _ in range(cfg.num_hidden_layers))
        if cfg.num_labels is None:
            self.head = BertMLMHead(cfg, self.embeddings.tokens)
        else:
            self.head = BertClassifierHead(cfg)
        init_weights(self, cfg.initializer_range)

    @property
    def is_classifier(self) -> bool:
        return self.config.num_labels is not None

    def stages(self) -> list[nn.Module]:
        return [self.embeddings, *self.blocks, self.head]


# ---------------------------------------------------------------- transformers twin: BertForMaskedLM
# (BertForSequenceClassification with num_labels)

def _hf_architecture(cfg: ModelConfig) -> str:
    return "BertForSequenceClassification" if cfg.num_labels else "BertForMaskedLM"


def _hf_table(cfg: ModelConfig):
    emb = "bert.embeddings."
    yield "embeddings.tokens.weight", emb + "word_embeddings.weight", SAME
    yield "embeddings.positions.weight", emb + "position_embeddings.weight", SAME
    yield "embeddings.token_types.weight", emb + "token_type_embeddings.weight", SAME
    yield from norm("embeddings.norm", emb + "LayerNorm")
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        qkv = tuple(theirs + f"attention.self.{x}" for x in ("query", "key", "value"))
        yield from linear(ours + "attn.qkv", qkv, SPLIT_QKV)
        yield from linear(ours + "attn.out", theirs + "attention.output.dense")
        yield from norm(ours + "ln_attn", theirs + "attention.output.LayerNorm")
        yield from linear(ours + "mlp.fc_in", theirs + "intermediate.dense")
        yield from linear(ours + "mlp.fc_out", theirs + "output.dense")
        yield from norm(ours + "ln_mlp", theirs + "output.LayerNorm")
    if cfg.num_labels:
        yield from linear("head.pooler", "bert.pooler.dense")
        yield from linear("head.classifier", "classifier")
    else:
        yield from linear("head.transform", "cls.predictions.transform.dense")
        yield from norm("head.norm", "cls.predictions.transform.LayerNorm")
        yield "head.bias", "cls.predictions.bias", SAME


def _hf_config(tf, cfg: ModelConfig, common: dict, label_names):
    labels = {}
    if cfg.num_labels:
        names = label_names or [f"LABEL_{i}" for i in range(cfg.num_labels)]
        labels = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    return tf.BertConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size, hidden_act="gelu", hidden_dropout_prob=cfg.dropout_rate,
        attention_probs_dropout_prob=cfg.attention_dropout_rate, max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=TYPE_VOCAB_SIZE, layer_norm_eps=cfg.layer_norm_epsilon,
        tie_word_embeddings=True, **common, **labels)


def _hf_fields(hf: dict, get, need) -> dict:
    need("hidden_act", ("gelu",))
    need("position_embedding_type", ("absolute",))
    need("type_vocab_size", (TYPE_VOCAB_SIZE,))
    need("tie_word_embeddings", (True,))
    is_classifier = any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])
    return dict(name="bert", vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                num_hidden_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                filter_size=get("intermediate_size"), max_position_embeddings=get("max_position_embeddings"),
                layer_norm_epsilon=get("layer_norm_eps"),
                num_labels=len(hf.get("id2label") or {}) if is_classifier else None)


SPEC = ModelSpec("bert", BertModel, MASKED_LM, keys=("num_labels",), classifier_key="num_labels", hf=HFTwin(
    model_type="bert", architecture=_hf_architecture, table=_hf_table, config=_hf_config, fields=_hf_fields,
    tied={"head.tokens.weight": "embeddings.tokens.weight"},
    buffers=("embeddings.position_ids", "embeddings.token_type_ids", "cls.predictions.decoder.weight",
             "cls.predictions.decoder.bias")))
