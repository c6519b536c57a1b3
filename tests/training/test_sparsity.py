"""Unstructured weight sparsity: masks, schedules, drop/regrow, and the same sparse run on the
resident CPU backend and on CSX (as tests/backends/csx/test_csx.py compares dense runs)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from modelzoo.backends.csx import CSXBackend
from modelzoo.backends.csx.plan import make_plan
from modelzoo.backends.csx.sparse_stream import compress, expand, streamed_bytes
from modelzoo.backends.resident import ResidentBackend
from modelzoo.cli import main as cli_main
from modelzoo.config import SparsityConfig, validate_params
from modelzoo.errors import ConfigError
from modelzoo.models import build_model
from modelzoo.training import sparsity as sp
from tests.helpers import assert_close_curves, make_params, tiny_config, train

TINY_GPTJ = tiny_config("gptj", max_position_embeddings=32)


def sparsifier(model, **cfg) -> sp.Sparsifier:
    s = sp.build_sparsifier(SparsityConfig(**cfg), model.named_parameters())
    weights = dict(model.named_parameters())
    s.initialize(weights)
    s.apply(weights)
    return s


# ---------------------------------------------------------------- groups and initial masks

def test_default_group_is_weight_matrices_but_embeddings():
    model = build_model(TINY_GPTJ)
    s = sparsifier(model, density=0.3)
    names = set(s.masks)
    assert "blocks.0.mlp.fc_in.weight" in names and "head.lm_head.weight" in names
    assert not any("embeddings" in n or n.endswith("bias") or ".ln_" in n for n in names)


def test_groups_take_parameters_by_first_matching_pattern():
    model = build_model(TINY_GPTJ)
    s = sparsifier(model, density=0.5, groups=[{"params": ["blocks.*.mlp.*.weight"], "density": 0.1, "name": "mlp"},
                                               {"params": ["*"], "density": 0.9}])
    assert s.group_of["blocks.1.mlp.fc_out.weight"].label == "mlp"
    assert s.group_of["embeddings.tokens.weight"].label == "group1"  # selected explicitly: sparse after all
    assert not any(g.label == "default" for g in s.groups)  # "*" left nothing for the top-level density
    with pytest.raises(ConfigError, match=r"sparsity.groups.0.params: \['blocks.\*.ffn.\*'\] match no parameter"):
        sp.build_sparsifier(SparsityConfig(groups=[{"params": ["blocks.*.ffn.*"], "density": 0.1}]),
                            model.named_parameters())


@pytest.mark.parametrize("init_method", ["random", "magnitude"])
def test_realised_density_equals_target(init_method):
    model = build_model(TINY_GPTJ)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = sparsifier(model, density=0.3, init_method=init_method)
    for name, p in model.named_parameters():
        if name not in s.masks:
            assert torch.equal(p, dense[name])
            continue
        mask = s.masks[name]
        assert int(mask.sum()) == round(0.3 * p.numel()), name
        assert torch.equal(p.detach(), dense[name] * mask)
        if init_method == "magnitude":  # every kept weight is at least as large as every pruned one
            assert dense[name].abs()[mask].min() >= dense[name].abs()[~mask].max()
    assert s.end_step() == {"sparsity/default/density": pytest.approx(0.3, abs=1e-3)}


def test_random_masks_depend_only_on_seed_and_name():
    a, b = build_model(TINY_GPTJ), build_model(TINY_GPTJ)
    sa, sb = sparsifier(a, density=0.3, seed=4), sparsifier(b, density=0.3, seed=4)
    assert all(torch.equal(sa.masks[n], sb.masks[n]) for n in sa.masks)
    sc = sparsifier(build_model(TINY_GPTJ), density=0.3, seed=5)
    assert not torch.equal(sa.masks["blocks.0.attn.qkv.weight"], sc.masks["blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------- schedules

def test_gmp_cubic_schedule_and_update_steps():
    cfg = SparsityConfig(algorithm="gmp", density=0.2, start_step=10, end_step=50, update_frequency=15)
    assert sp.gmp_density_at(cfg, 0.2, 5) == 1.0
    assert sp.gmp_density_at(cfg, 0.2, 30) == pytest.approx(0.2 + 0.8 * 0.5 ** 3)
    assert sp.gmp_density_at(cfg, 0.2, 50) == sp.gmp_density_at(cfg, 0.2, 99) == pytest.approx(0.2)
    assert [t for t in range(1, 100) if sp.is_update_step(cfg, t)] == [25, 40, 50]


def test_rigl_drop_fraction_decays_on_a_cosine_to_zero():
    cfg = SparsityConfig(algorithm="rigl", density=0.3, drop_fraction=0.4, end_step=100, update_frequency=25)
    assert sp.drop_fraction_at(cfg, 0) == pytest.approx(0.4)
    assert sp.drop_fraction_at(cfg, 50) == pytest.approx(0.2)
    assert sp.drop_fraction_at(cfg, 100) == 0.0
    assert [t for t in range(1, 200) if sp.is_update_step(cfg, t)] == [25, 50, 75]
    assert not any(sp.is_update_step(SparsityConfig(density=0.3), t) for t in range(1, 1000))


# ---------------------------------------------------------------- drop and regrow on one tensor

def one_tensor(algorithm, weight, **cfg) -> tuple[sp.Sparsifier, torch.Tensor]:
    cfg = SparsityConfig(algorithm=algorithm, groups=[{"params": ["w"], "density": 0.5}], **cfg)
    s = sp.Sparsifier(cfg, sp.select_groups(cfg, [("w", weight.shape)]))
    s.initialize({"w": weight})
    s.apply({"w": weight})
    return s, weight


def test_rigl_drops_smallest_weights_regrows_largest_gradients_and_resets_their_state():
    weight = torch.tensor([[5.0, 4.0, 3.0, 0.1], [6.0, 7.0, 8.0, 0.2]])
    s, w = one_tensor("rigl", weight, init_method="magnitude", update_frequency=1, end_step=4, drop_fraction=0.5)
    before = s.masks["w"].clone()  # kept: 5, 6, 7, 8
    grad = torch.tensor([[0.0, 9.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    s.mask_gradient("w", grad)
    assert torch.equal(grad, torch.zeros_like(grad))  # only pruned positions had a gradient
    state = {"exp_avg": torch.ones_like(w), "exp_avg_sq": torch.ones_like(w), "step": torch.tensor(3.0)}
    s.update("w", w, state)
    # drop fraction 0.5 * cos decay at step 1 of 4 -> int(0.4268 * 4) = 1 moved: 5 out, the 9-gradient 4.0 in
    after = s.masks["w"]
    assert after.sum() == before.sum()
    assert torch.equal(after, torch.tensor([[False, True, False, False], [True, True, True, False]]))
    assert w[0, 1] == 0 and w[0, 0] == 0  # regrown at zero, dropped to zero
    survivors = (after & before).float()
    assert torch.equal(state["exp_avg"], survivors) and torch.equal(state["exp_avg_sq"], survivors)
    assert float(state["step"]) == 3.0
    assert s.end_step()["sparsity/group0/moved"] == 1


def test_set_regrows_at_random_with_a_fixed_count():
    s, w = one_tensor("set", torch.randn(64, 64), update_frequency=1, end_step=10)
    for _ in range(5):
        before = s.masks["w"].clone()
        s.mask_gradient("w", torch.randn(64, 64))
        s.update("w", w, {})
        metrics = s.end_step()
        assert s.masks["w"].sum() == before.sum() == 2048
        assert metrics["sparsity/group0/moved"] == int((s.masks["w"] & ~before).sum()) > 0
        assert (w[~s.masks["w"]] == 0).all()


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize("section,message", [
    ({"algorithm": "lottery", "density": 0.3}, "sparsity.algorithm: Input should be 'static', 'rigl', 'set' or 'gmp'"),
    ({"density": 0.0}, "sparsity.density: Input should be greater than 0 (got 0.0)"),
    ({"density": 1.5}, "sparsity.density: Input should be less than or equal to 1 (got 1.5)"),
    ({"groups": [{"params": ["*"], "density": -1}]}, "sparsity.groups.0.density: Input should be greater than 0"),
    ({"algorithm": "rigl", "density": 0.3}, "sparsity.end_step: required for algorithm rigl"),
    ({"density": 0.3, "drop_fraction": 0.1}, "sparsity.drop_fraction: applies to algorithm rigl or set, not static"),
    ({"density": 0.3, "dropfraction": 0.1}, "sparsity.dropfraction: unknown key; did you mean 'drop_fraction'?"),
])
def test_bad_sparsity_sections_are_one_line_errors(tmp_path, capsys, section, message):
    raw = {"model": TINY_GPTJ.model_dump(), "sparsity": section, "runconfig": {"model_dir": str(tmp_path / "m")}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["CPU", "--params", str(path), "--validate_only"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- CSX streaming

def test_compressed_stream_round_trips_and_counts_values_plus_occupancy():
    dense = torch.randn(30, 17).to(torch.bfloat16)
    mask = torch.rand(30, 17) < 0.3
    payload = compress(dense * mask, mask)
    assert torch.equal(expand(payload), dense * mask)
    assert payload.nbytes == int(mask.sum()) * 2 + math.ceil(30 * 17 / 8)


# ---------------------------------------------------------------- whole runs, CPU against CSX

def sparse_params(data_dir, section, **kw):
    raw = make_params(data_dir, "gptj", dropout=0.0, **kw).model_dump()
    raw["sparsity"] = section
    return validate_params(raw, check_paths=False)


def sparse_run(kind, params, steps):
    torch.manual_seed(params.runconfig.seed)
    backend = ResidentBackend("cpu") if kind == "cpu" else CSXBackend(params)
    backend.setup(build_model(params.model), params.optimizer, params.sparsity)
    metrics, step = [], backend.train_step

    def recording(micro_batches, lr):
        m = step(micro_batches, lr)
        metrics.append({k: v for k, v in m.items() if k.startswith("sparsity/")})
        return m

    backend.train_step = recording
    curve, _ = train(kind, params, steps=steps, backend=backend)
    return curve, backend, metrics


@pytest.mark.parametrize("section", [
    {"density": 0.3, "init_method": "magnitude"},
    {"algorithm": "rigl", "density": 0.3, "update_frequency": 2, "end_step": 8},
    {"algorithm": "gmp", "density": 0.25, "update_frequency": 2, "start_step": 1, "end_step": 7},
], ids=["static", "rigl", "gmp"])
def test_sparse_run_agrees_on_cpu_and_csx(data_dir, section):
    params = sparse_params(data_dir, section)
    target = section["density"]
    cpu, cpu_backend, cpu_metrics = sparse_run("cpu", params, steps=10)
    csx, csx_backend, csx_metrics = sparse_run("csx", params, steps=10)
    assert_close_curves(cpu, csx)
    assert cpu_metrics == csx_metrics
    assert cpu_metrics[-1] == {} and cpu_metrics[0]  # reported at the start and at mask updates only
    assert [m["sparsity/default/density"] for m in cpu_metrics if m][-1] == pytest.approx(target, abs=1e-3)
    if section.get("algorithm") in ("rigl", "gmp"):
        assert any(m.get("sparsity/default/moved", 0) > 0 for m in cpu_metrics)
    a, b = cpu_backend.state_dict(), csx_backend.state_dict()
    assert a["sparsity"]["masks"].keys() == b["sparsity"]["masks"].keys() and a["sparsity"]["step"] == 10
    for name, mask in a["sparsity"]["masks"].items():
        assert torch.equal(mask, b["sparsity"]["masks"][name]), name
        assert int(mask.sum()) == round(target * mask.numel()), name
        for state in (a, b):  # pruned weights are exactly zero after every update, and so is their state
            assert (state["model"][name][~mask] == 0).all(), name
            assert (state["optimizer"]["state"][name]["exp_avg"][~mask] == 0).all(), name
            assert (state["model"][name][mask] != 0).any(), name


def test_csx_streams_what_the_plan_says(data_dir):
    params = sparse_params(data_dir, {"density": 0.3}, mixed=True)
    _, backend, _ = sparse_run("csx", params, steps=1)
    streamed = backend.sparse_stream.bytes_in
    model = build_model(params.model)
    plan = make_plan(model, backend.micro_batch, backend.micro_batches, 1, 1, params.optimizer)
    expected = streamed_bytes(plan, model, sp.build_sparsifier(params.sparsity, model.named_parameters()), True)
    assert expected.dense_step == plan.streamed_in  # the dense figure is the plan's own
    assert streamed == expected.sparse_step < expected.dense_step


def test_compile_only_plan_shows_dense_and_sparse_bytes(data_dir, tmp_path, capsys):
    raw = yaml.safe_load(sparse_params(data_dir, {"density": 0.3}, tmp=tmp_path / "m").to_yaml())
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["CSX", "--params", str(path), "--compile_only"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("weights streamed per step per system: dense"))
    assert "sparse" in line and "x); gradients out stay dense" in line
    assert "sparse streaming (static sparsity, density default 0.3 (9 tensors))" in out


# ---------------------------------------------------------------- checkpoints and TensorBoard

@pytest.mark.parametrize("device", ["CPU", "CSX"])
def test_resume_keeps_masks_bit_exact_and_logs_sparsity(shards_msl64, tmp_path, device):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from modelzoo.training.checkpoint import load_checkpoint
    from tests.helpers import tiny_params, write_params

    def params(model_dir):
        raw = tiny_params(shards_msl64, model_dir, max_steps=6, checkpoint_steps=3)
        raw["model"]["name"], raw["model"]["dropout_rate"] = "gptj", 0.0
        raw["sparsity"] = {"algorithm": "set", "density": 0.4, "update_frequency": 2, "end_step": 6}
        return write_params(tmp_path / f"{model_dir.name}.yaml", raw)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli_main([device, "--params", str(params(straight)), "--mode", "train"]) == 0
    assert cli_main([device, "--params", str(params(resumed)), "--mode", "train", "--max_steps", "3"]) == 0
    assert cli_main([device, "--params", str(params(resumed)), "--mode", "train"]) == 0
    a, b = load_checkpoint(straight / "checkpoint_6.mdl"), load_checkpoint(resumed / "checkpoint_6.mdl")
    assert a["sparsity"]["step"] == b["sparsity"]["step"] == 6
    assert a["sparsity"]["masks"].keys() == b["sparsity"]["masks"].keys()
    first = load_checkpoint(resumed / "checkpoint_3.mdl")["sparsity"]["masks"]
    assert any(not torch.equal(first[n], m) for n, m in b["sparsity"]["masks"].items())  # step 4 moved some
    for name, mask in a["sparsity"]["masks"].items():
        assert torch.equal(mask, b["sparsity"]["masks"][name]), name
        assert torch.equal(a["model"][name], b["model"][name]), name
    events = EventAccumulator(str(straight / "train")).Reload()
    density = events.Scalars("sparsity/default/density")
    assert [e.step for e in density] == [1, 2, 4] and density[-1].value == pytest.approx(0.4, abs=1e-3)
    assert [e.step for e in events.Scalars("sparsity/default/moved")] == [2, 4]
