"""Every registered model (GPT-2, GPT-J, GPT-NeoX, BERT): stage structure, tied weights, rotary positions, masking, heads."""

import pytest
import torch

from modelzoo.config import ModelConfig
from modelzoo.models import CLASSIFY, MODELS, build_model, objective_of, transfer_backbone
from modelzoo.models.layers import Rotary
from modelzoo.errors import CheckpointError
from tests.helpers import tiny_config, tiny_model

CAUSAL = [name for name, spec in MODELS.items() if spec.generates]
# each registered model, and BERT as a classifier (its head and loss differ)
VARIANTS = {**{name: {"name": name} for name in MODELS}, "bert-classifier": {"name": "bert", "num_labels": 3}}


def small(variant: str, **extra) -> torch.nn.Module:
    return tiny_model(**VARIANTS[variant], **extra).eval()


def batch(n=2, t=24, pad_from=None):
    torch.manual_seed(1)
    ids = torch.randint(5, 69, (n, t))
    mask = torch.ones_like(ids)
    if pad_from is not None:
        ids[-1, pad_from:], mask[-1, pad_from:] = 3, 0
    return {"input_ids": ids, "attention_mask": mask}


def test_model_name_is_checked_against_the_registry():
    for name, spec in MODELS.items():
        assert ModelConfig(**spec.debug_config()).name == name
    with pytest.raises(ValueError, match="Input should be 'gpt2', 'gptj', 'gpt_neox' or 'bert'"):
        ModelConfig(**MODELS["gpt2"].debug_config(name="gpt3"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_stages_compose_to_forward(variant):
    model, b = small(variant), batch()
    # labels for the head's loss: a class per sequence, else a token per position
    b["labels"] = torch.tensor([0, 2]) if objective_of(model.config) == CLASSIFY else b["input_ids"].roll(-1, 1)
    stages = model.stages()
    assert len(stages) == tiny_config().num_hidden_layers + 2
    hidden = None
    for stage in stages[:-1]:
        hidden = stage(hidden, b)
    staged, whole = stages[-1](hidden, b), model(b)
    assert torch.equal(staged["logits"], whole["logits"]) and torch.equal(staged["loss"], whole["loss"])
    owned = {id(p) for s in stages for p in s.parameters()}
    assert owned == {id(p) for p in model.parameters()}  # no parameter lives outside the stages


@pytest.mark.parametrize("variant", MODELS)
def test_tied_embedding_is_one_parameter_in_two_stages(variant):
    model, tied = small(variant), bool(MODELS[variant].hf.tied)  # the spec declares what its head shares
    first, last = model.stages()[0], model.stages()[-1]
    shared = {id(p) for p in first.parameters()} & {id(p) for p in last.parameters()}
    assert (shared == {id(model.embeddings.tokens.weight)}) if tied else not shared
    if not tied:  # an untied LM head: GPT-J's with a bias, GPT-NeoX's without
        assert (model.head.lm_head.bias is not None) == (variant == "gptj")


def test_gptj_has_no_attention_biases_and_parallel_block():
    model = small("gptj")
    block = model.blocks[0]
    assert block.attn.qkv.bias is None and block.attn.out.bias is None
    assert not hasattr(block, "ln_2")  # attention and MLP both read ln_1's output
    h, b = torch.randn(2, 24, 32), batch()
    normed = block.ln_1(h)
    torch.testing.assert_close(block(h, b), h + block.attn(normed) + block.mlp(normed))


def test_rotary_scores_depend_only_on_relative_position():
    rotary = Rotary(rotary_dim=8)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    t = 12
    qs, ks = rotary(q.expand(1, 1, t, 16), k.expand(1, 1, t, 16))
    scores = qs[0, 0] @ ks[0, 0].t()  # scores[i, j] for the same q and k placed at i and j
    for offset in (0, 1, 5):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal))
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 3)[0])
    # dimensions beyond rotary_dim pass through untouched; position 0 is not rotated
    assert torch.equal(qs[..., 8:], q.expand(1, 1, t, 16)[..., 8:])
    torch.testing.assert_close(qs[..., 0, :], q[..., 0, :])


def test_rotary_interleaves_pairs_like_gptj():
    rotary = Rotary(rotary_dim=4)
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4).expand(1, 1, 2, 4)
    out, _ = rotary(x, x)
    # position 1, pair (0, 1) turns by 1 rad, pair (2, 3) by 1/100 rad (base 10000, d 4)
    angle0, angle1 = torch.tensor(1.0), torch.tensor(0.01)
    expected = torch.stack([angle0.cos(), angle0.sin(), -angle1.sin(), angle1.cos()])
    torch.testing.assert_close(out[0, 0, 1], expected)


def test_gptj_rotary_dim_defaults_to_a_quarter_of_each_head():
    model = build_model(ModelConfig(name="gptj", hidden_size=64, num_hidden_layers=1, num_heads=2,
                                    max_position_embeddings=8))
    assert model.blocks[0].attn.rotary.rotary_dim == 8


@pytest.mark.parametrize("variant", CAUSAL)
def test_causal_models_do_not_look_ahead(variant):
    model, b = small(variant), batch()
    changed = {k: v.clone() for k, v in b.items()}
    changed["input_ids"][:, 12:] = 7
    with torch.no_grad():
        before, after = model(b)["logits"], model(changed)["logits"]
    torch.testing.assert_close(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_bert_attends_both_ways_but_never_to_padding():
    model, b = small("bert"), batch(pad_from=16)
    with torch.no_grad():
        base = model(b)["logits"]
        later = {k: v.clone() for k, v in b.items()}
        later["input_ids"][0, 20] = 9  # a later codon changes earlier positions (bidirectional)
        assert not torch.allclose(model(later)["logits"][0, :5], base[0, :5])
        padded = {k: v.clone() for k, v in b.items()}
        padded["input_ids"][1, 16:] = 9  # what sits under [PAD] positions is never attended to
        torch.testing.assert_close(model(padded)["logits"][1, :16], base[1, :16])


def test_bert_classifier_scores_one_label_per_sequence():
    model, b = small("bert-classifier"), batch(n=3)
    out = model({**b, "labels": torch.tensor([0, 2, 1])})
    assert out["logits"].shape == (3, 3) and out["loss"].ndim == 0
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("variant", MODELS)
def test_loss_ignores_unlabelled_positions(variant):
    model, b = small(variant), batch()
    labels = torch.full((2, 24), -100)
    labels[:, 3] = 11
    out = model({**b, "labels": labels})
    expected = torch.nn.functional.cross_entropy(out["logits"][:, 3], labels[:, 3])
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_only_in_training(variant):
    model, b = small(variant, dropout_rate=0.5), batch()
    assert torch.equal(model(b)["logits"], model(b)["logits"])
    model.train()
    assert not torch.equal(model(b)["logits"], model(b)["logits"])


def test_classifier_takes_the_pretrained_backbone_and_a_fresh_head():
    mlm, classifier = small("bert").state_dict(), small("bert-classifier").state_dict()
    mlm = {k: v + 1 for k, v in mlm.items()}  # tell the two apart
    merged = transfer_backbone(mlm, classifier, "mlm.mdl")
    assert merged.keys() == classifier.keys()
    for name, tensor in merged.items():
        assert torch.equal(tensor, mlm[name] if name in mlm else classifier[name])
    assert torch.equal(merged["embeddings.tokens.weight"], mlm["embeddings.tokens.weight"])
    assert transfer_backbone(mlm, mlm, "same") is mlm


def test_backbone_of_another_architecture_is_refused():
    with pytest.raises(CheckpointError, match="gpt.mdl: checkpoint has no tensor 'embeddings.token_types.weight'.*another model"):
        transfer_backbone(small("gpt2").state_dict(), small("bert-classifier").state_dict(), "gpt.mdl")


def test_meta_device_build_allocates_nothing():
    with torch.device("meta"):
        model = build_model(ModelConfig(name="gptj", hidden_size=4096, num_hidden_layers=2, num_heads=32,
                                        max_position_embeddings=2048))
    assert all(p.is_meta for p in model.parameters())
