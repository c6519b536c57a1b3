"""model.attention_in_fp32: "auto" (the default) computes attention in fp32 under low-precision
autocast on CPUs that multiply matrices no faster in that dtype than in fp32 (a measured figure,
replaced here) and in the autocast dtype elsewhere; true and false force it."""

import copy

import pytest
import torch

from modelzoo.config import validate_params
from modelzoo.errors import ConfigError
from modelzoo.models import MODELS, build_model, layers
from modelzoo.models.layers import attention_in_fp32
from tests.helpers import tiny_config, tiny_model, tiny_params

IDS = torch.randint(5, 69, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny(name: str, **fields) -> torch.nn.Module:
    return tiny_model(name, max_position_embeddings=16, mixed_precision=True, **fields).eval()


def sdpa_dtypes(monkeypatch, model) -> tuple[set, torch.Tensor]:
    """The dtypes attention computed in during one bf16-autocast forward, and the logits."""
    seen, sdpa = set(), torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kw):
        out = sdpa(q, k, v, **kw)
        seen.add((q.dtype, out.dtype))
        return out
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model({"input_ids": IDS, "attention_mask": torch.ones_like(IDS)})["logits"]
    return seen, logits


def test_the_choice_follows_setting_device_and_dtype(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    monkeypatch.setattr(layers, "cpu_matmul_speedup", lambda dtype: 0.5)
    assert attention_in_fp32("auto", cpu, bf16) and attention_in_fp32("auto", cpu, fp16)
    assert not attention_in_fp32("auto", cuda, bf16)
    assert not attention_in_fp32("auto", cpu, fp32) and not attention_in_fp32(True, cpu, fp32)  # nothing to cast
    assert attention_in_fp32(True, cuda, bf16) and not attention_in_fp32(False, cpu, bf16)
    monkeypatch.setattr(layers, "cpu_matmul_speedup", lambda dtype: 2.0 if dtype == bf16 else 0.5)
    assert not attention_in_fp32("auto", cpu, bf16) and attention_in_fp32("auto", cpu, fp16)
    assert attention_in_fp32(True, cpu, bf16)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_auto_is_applied_by_every_model(monkeypatch, name):
    """Default config: fp32 attention where bf16 matmuls are slower, bf16 where faster; auto equals
    the forced setting it resolves to, to the bit."""
    model = tiny(name)
    assert model.config.attention_in_fp32 == "auto"
    monkeypatch.setattr(layers, "cpu_matmul_speedup", lambda dtype: 0.5)
    seen, auto_slower = sdpa_dtypes(monkeypatch, model)
    assert seen == {(torch.float32, torch.float32)}
    monkeypatch.setattr(layers, "cpu_matmul_speedup", lambda dtype: 2.0)
    seen, auto_faster = sdpa_dtypes(monkeypatch, model)
    assert seen == {(torch.bfloat16, torch.bfloat16)}
    for forced, expected in ((True, auto_slower), (False, auto_faster)):
        twin = tiny(name, attention_in_fp32=forced)
        twin.load_state_dict(model.state_dict())
        assert torch.equal(sdpa_dtypes(monkeypatch, twin)[1], expected)
    assert not torch.equal(auto_slower, auto_faster)  # the choice changes the numbers: it was really made


def test_fp32_attention_trains_under_bf16_autocast(monkeypatch):
    monkeypatch.setattr(layers, "cpu_matmul_speedup", lambda dtype: 0.5)
    model = tiny("gptj").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model({"input_ids": IDS, "labels": IDS})["loss"]
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_attention_in_fp32_under_bf16_autocast(monkeypatch):
    """attention_in_fp32: the attention kernel gets fp32 q/k/v under bf16 autocast (without it,
    bf16), the block's output stays in the autocast dtype, and the model trains."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kw):
        seen.append(q.dtype)
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    ids = torch.randint(5, 69, (2, 32), generator=torch.Generator().manual_seed(0))
    for flag, expected in ((False, torch.bfloat16), (True, torch.float32)):
        cfg = tiny_config("gptj", hidden_size=64, max_position_embeddings=32, mixed_precision=True,
                          attention_in_fp32=flag)
        model = build_model(cfg)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model({"input_ids": ids, "labels": ids})["loss"]
            attn_out = model.blocks[0].attn(torch.randn(2, 32, 64))
        assert seen and set(seen) == {expected}
        assert attn_out.dtype == torch.bfloat16
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_bad_value_is_one_line_naming_the_key(shards_msl64, tmp_path):
    raw = copy.deepcopy(tiny_params(shards_msl64, tmp_path / "md"))
    raw["model"]["attention_in_fp32"] = "fast"
    with pytest.raises(ConfigError) as e:
        validate_params(raw, "p.yaml")
    assert str(e.value) == "p.yaml: model.attention_in_fp32: Input should be True, False or 'auto' (got 'fast')"
    raw["model"]["attention_in_fp32"] = True
    assert validate_params(raw, "p.yaml").model.attention_in_fp32 is True
