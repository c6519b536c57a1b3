import torch

from modelzoo.config import ModelConfig
from modelzoo.models import build_model
from modelzoo.data.tokenizer import CodonTokenizer
from tests.conftest import GENOMES
from modelzoo.data.sequences import read_records


def tiny_gpt2(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(name="gpt2", hidden_size=32, num_hidden_layers=2, num_heads=4, max_position_embeddings=64, **kw)
    return build_model(cfg).eval()


def codon_batch(length=64, n=2):
    genome = next(iter(read_records(GENOMES))).seq
    ids = torch.from_numpy(CodonTokenizer().encode(genome)[: n * length].astype("int64")).view(n, length)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return {"input_ids": ids, "labels": labels}


def test_stages_compose_to_forward():
    model, batch = tiny_gpt2(), codon_batch()
    hidden = None
    for stage in model.stages()[:-1]:
        hidden = stage(hidden, batch)
    staged = model.stages()[-1](hidden, batch)
    out = model(batch)
    assert torch.equal(staged["logits"], out["logits"]) and torch.equal(staged["loss"], out["loss"])
    assert len(model.stages()) == 2 + 2


def test_causal_future_tokens_do_not_change_past_logits():
    model, batch = tiny_gpt2(), codon_batch()
    changed = {"input_ids": batch["input_ids"].clone()}
    changed["input_ids"][:, 40:] = 5
    a, b = model(batch)["logits"], model(changed)["logits"]
    assert torch.allclose(a[:, :40], b[:, :40], atol=1e-6)
    assert not torch.allclose(a[:, 40:], b[:, 40:])


def test_lm_head_is_tied_to_the_token_embedding():
    model = tiny_gpt2()
    head, embedding = model.stages()[-1], model.stages()[0]
    assert head.tokens.weight is embedding.tokens.weight
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(id(p) for p in model.parameters()))


def test_loss_ignores_unlabelled_positions_and_matches_manual_cross_entropy():
    model, batch = tiny_gpt2(), codon_batch()
    batch["labels"][0, 10:] = -100
    out = model(batch)
    keep = batch["labels"] != -100
    manual = torch.nn.functional.cross_entropy(out["logits"][keep], batch["labels"][keep])
    assert torch.allclose(out["loss"], manual, atol=1e-6)


def test_dropout_only_in_training():
    model, batch = tiny_gpt2(dropout_rate=0.5), codon_batch()
    assert torch.equal(model(batch)["logits"], model(batch)["logits"])
    model.train()
    assert not torch.equal(model(batch)["logits"], model(batch)["logits"])
