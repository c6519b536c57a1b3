"""Each architecture against its transformers twin: same random weights, same logits (fp32)."""


import numpy as np
import pytest
import torch

from modelzoo.config import ModelConfig
from modelzoo.data.sequences import read_records
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.models import MODELS, build_model, hf
from tests.helpers import GENOMES, tiny_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LENGTH = 48
TOLERANCE = 1e-4

ARCHITECTURES = {
    "gpt2": dict(name="gpt2"),
    "gptj": dict(name="gptj", rotary_dim=4),  # head_dim 16: rotary on a quarter, the rest passes through
    "gpt_neox": dict(name="gpt_neox", rotary_pct=0.5),  # head_dim 16: 8 rotated dims, the rest passes through
    "bert-mlm": dict(name="bert", layer_norm_epsilon=1e-12),
    "bert-classifier": dict(name="bert", num_labels=3),
}


def real_codon_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of three SARS-CoV-2 genomes (one from the 5' end, one from spike, one with IUPAC/N
    codons), the last one short and right-padded."""
    tok = CodonTokenizer()
    genomes = [tok.encode(r.seq) for r in read_records(GENOMES)]
    rows = [genomes[0][:LENGTH], genomes[1][7000:7000 + LENGTH]]
    unk_at = int(np.flatnonzero(genomes[2] == tok.unk_id)[0])
    rows.append(genomes[2][unk_at - 10: unk_at + LENGTH - 20])
    ids = torch.full((3, LENGTH), tok.pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.from_numpy(row.astype(np.int64))
    mask = (ids != tok.pad_id).long()
    return ids, mask


def randomised(cfg: ModelConfig):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # larger than the init std so every tensor, LayerNorms included, matters
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def test_every_registered_model_is_compared():
    assert {arch["name"] for arch in ARCHITECTURES.values()} == set(MODELS)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_equal_transformers_twin(arch, tmp_path):
    cfg = tiny_config(hidden_size=64, max_position_embeddings=LENGTH, **ARCHITECTURES[arch])
    ours = randomised(cfg)
    hf.save_hf(tmp_path / "hf", cfg, ours.state_dict())
    twin, info = getattr(transformers, hf.architecture(cfg)).from_pretrained(tmp_path / "hf",
                                                                            output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    twin.eval()

    ids, mask = real_codon_batch()
    assert (ids == CodonTokenizer().unk_id).any()
    with torch.no_grad():
        our_logits = ours({"input_ids": ids, "attention_mask": mask})["logits"]
        their_logits = twin(input_ids=ids, attention_mask=mask).logits
    if our_logits.dim() == 3:  # token logits: compare where there are codons (padding is never scored)
        our_logits, their_logits = our_logits[mask.bool()], their_logits[mask.bool()]
    assert our_logits.shape == their_logits.shape
    torch.testing.assert_close(our_logits, their_logits, rtol=0, atol=TOLERANCE)
    assert our_logits.std() > 0.1  # the comparison is not between two near-constant outputs


def test_exported_tokenizer_gives_our_ids(tmp_path):
    cfg = tiny_config(hidden_size=16, num_hidden_layers=1, num_heads=2, max_position_embeddings=8)
    hf.save_hf(tmp_path / "hf", cfg, build_model(cfg).state_dict())
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")
    ours = CodonTokenizer()
    seq = next(iter(read_records(GENOMES))).seq[:300]
    codons = " ".join(seq[i:i + 3] for i in range(0, 300, 3))
    assert fast(codons)["input_ids"] == ours.encode(seq).tolist()
    assert (fast.pad_token_id, fast.mask_token_id, fast.cls_token_id) == (ours.pad_id, ours.mask_id, ours.cls_id)
