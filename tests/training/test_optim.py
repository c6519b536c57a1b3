import math

import pytest
import torch

from modelzoo.config import OptimizerConfig
from modelzoo.models import MODELS
from modelzoo.training.optim import build_optimizer, clip_gradients, learning_rate_at, param_groups
from tests.helpers import tiny_config


def schedule(*phases):
    return OptimizerConfig(learning_rate=list(phases))


def test_constant():
    cfg = OptimizerConfig(learning_rate=3e-4)
    assert [learning_rate_at(s, cfg) for s in (0, 10, 10_000)] == [3e-4] * 3


def test_warmup_then_cosine_then_hold():
    cfg = schedule({"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 1.0, "total_iters": 10},
                   {"scheduler": "CosineDecay", "initial_learning_rate": 1.0, "end_learning_rate": 0.1,
                    "total_iters": 100})
    assert learning_rate_at(0, cfg) == 0.0
    assert learning_rate_at(5, cfg) == pytest.approx(0.5)
    assert learning_rate_at(10, cfg) == pytest.approx(1.0)
    assert learning_rate_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate_at(110, cfg) == pytest.approx(0.1)
    assert learning_rate_at(5000, cfg) == pytest.approx(0.1)


def test_linear_decay_and_constant_phase():
    cfg = schedule({"scheduler": "Constant", "learning_rate": 0.5, "total_iters": 4},
                   {"scheduler": "Linear", "initial_learning_rate": 0.5, "end_learning_rate": 0.0, "total_iters": 4})
    assert [learning_rate_at(s, cfg) for s in range(10)] == pytest.approx([0.5] * 4 + [0.5, 0.375, 0.25, 0.125, 0, 0])


def test_the_model_zoos_other_schedules():
    """Exponential, Step, Polynomial, InverseSquareRootDecay: the Cerebras Model Zoo's formulas,
    each counting steps from its phase's start."""
    cfg = schedule({"scheduler": "Exponential", "initial_learning_rate": 1.0, "decay_rate": 0.5, "decay_steps": 4,
                    "total_iters": 6},
                   {"scheduler": "Step", "initial_learning_rate": 0.5, "step_size": 2, "gamma": 0.1, "total_iters": 5},
                   {"scheduler": "Polynomial", "initial_learning_rate": 0.2, "end_learning_rate": 0.1,
                    "total_iters": 4, "power": 3.0},
                   {"scheduler": "InverseSquareRootDecay", "initial_learning_rate": 0.3, "scale": 2.0,
                    "warmup_steps": 4})
    lr = [learning_rate_at(s, cfg) for s in range(25)]
    assert lr[:6] == pytest.approx([0.5 ** (s / 4) for s in range(6)])
    assert lr[6:11] == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005])
    assert lr[11:15] == pytest.approx([0.1 + 0.1 * (1 - s / 4) ** 3 for s in range(4)])
    assert lr[15:25] == pytest.approx([0.3 * 2.0 / math.sqrt(max(s, 4)) for s in range(10)])


def test_only_the_last_phase_may_be_open_ended():
    with pytest.raises(ValueError, match="total_iters"):
        schedule({"scheduler": "Constant", "learning_rate": 0.5}, {"scheduler": "Constant", "learning_rate": 0.1})


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model.named_parameters(), OptimizerConfig(learning_rate=0.1, weight_decay=0.1))
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight)}


def test_adamw_decay_leaves_bias_alone_with_zero_grads():
    model = torch.nn.Linear(3, 3)
    opt = build_optimizer(model.named_parameters(), OptimizerConfig(learning_rate=0.1, weight_decay=0.5))
    before_w, before_b = model.weight.detach().clone(), model.bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model.weight, before_w * (1 - 0.1 * 0.5))
    assert torch.equal(model.bias, before_b)


def test_clipping_returns_norm_before_clipping():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)
    assert clip_gradients([p], max_norm=1.0) == pytest.approx(6.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.full((4,), 3.0)
    assert clip_gradients([p], max_norm=None) == pytest.approx(6.0)
    assert float(p.grad.norm()) == pytest.approx(6.0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_weight_decay_spares_embedding_tables_biases_and_norms(name):
    """As docs/params.md says: with zero gradients an AdamW step moves only by weight decay, so
    exactly the weight matrices outside the embedding tables shrink."""
    from modelzoo.config import ModelConfig
    from modelzoo.models import build_model
    model = build_model(tiny_config(name, hidden_size=16, num_hidden_layers=1, num_heads=2, max_position_embeddings=16))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = build_optimizer(model.named_parameters(), OptimizerConfig(learning_rate=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    matrices = {k for k, p in model.named_parameters() if p.ndim == 2}
    tables = {k for k in matrices if k.startswith("embeddings.")}
    assert tables and moved == matrices - tables
