"""Cerebras Model Zoo params files (both layouts) run as they are: the translation gives the same
params, and the same training, as the equivalent native file; every problem is one line, all at
once, in file order; the generated docs/modelzoo.md is current."""

import math
import re
from pathlib import Path

import pytest
import yaml

from modelzoo.cli import main
from modelzoo.config import load_params, validate_params
from modelzoo.errors import ConfigError
from modelzoo.modelzoo_params import RULES, is_modelzoo_file, reference_markdown
from modelzoo.tools.convert_params import main as convert_main
from modelzoo.training.optim import learning_rate_at
from tests.helpers import DATA, REPO, tensorboard_scalars, write_params
from tests.helpers import modelzoo_fixture as fixture  # a Model Zoo params file of FIXTURES, filled in

FIXTURES = DATA / "modelzoo"


def native(shards: Path, model_dir: Path, model: dict, optimizer: dict, runconfig: dict, train: dict,
           eval_: dict | None = None) -> dict:
    raw = {"train_input": {"data_dir": str(shards / "train"), "batch_size": 4, "max_seq_length": 64, **train},
           "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 4, "max_position_embeddings": 64,
                     **model},
           "optimizer": optimizer, "runconfig": {"model_dir": str(model_dir), **runconfig}}
    if eval_ is not None:
        raw["eval_input"] = {"data_dir": str(shards / "val"), "batch_size": 4, "max_seq_length": 64, **eval_}
    return raw


def gpt_native(shards, model_dir, model: dict, lr: tuple, seed: int, shuffle_seed: int, checkpoint_steps: int):
    """Both fixtures' runs: AdamW, a linear warm-up to ``lr[0]`` over ``lr[1]`` steps, then a cosine
    decay to ``lr[2]`` over ``lr[3]``; two steps."""
    peak, warmup, end, decay = lr
    return native(shards, model_dir, {"filter_size": 128, "fp16_type": "bfloat16", **model},
                  {"optimizer_type": "AdamW", "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.01,
                   "max_gradient_norm": 1.0,
                   "learning_rate": [{"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": peak,
                                      "total_iters": warmup},
                                     {"scheduler": "CosineDecay", "initial_learning_rate": peak,
                                      "end_learning_rate": end, "total_iters": decay}]},
                  {"max_steps": 2, "log_steps": 1, "checkpoint_steps": checkpoint_steps, "seed": seed, "eval_steps": 2},
                  {"shuffle": True, "shuffle_seed": shuffle_seed, "num_workers": 0}, {"shuffle": False, "num_workers": 0})


def gpt2_native(shards, model_dir) -> dict:
    model = {"name": "gpt2", "dropout_rate": 0.1, "attention_dropout_rate": 0.1, "initializer_range": 0.02}
    return gpt_native(shards, model_dir, model, (0.003, 3, 0.0003, 20), seed=3, shuffle_seed=7, checkpoint_steps=0)


def neox_native(shards, model_dir) -> dict:
    model = {"name": "gpt_neox", "rotary_pct": 0.25}
    return gpt_native(shards, model_dir, model, (0.002, 2, 0.0002, 10), seed=5, shuffle_seed=11, checkpoint_steps=1)


def same_params(a, b) -> None:
    assert a.model_dump() == b.model_dump()


# ------------------------------------------------------------------ translation equals native

@pytest.mark.parametrize("name,expected", [("gpt2_sectioned.yaml", gpt2_native), ("neox_trainer.yaml", neox_native)])
def test_modelzoo_file_gives_the_native_params(name, expected, shards_msl64, tmp_path):
    params = load_params(fixture(name, tmp_path, shards_msl64))
    same_params(params, validate_params(expected(shards_msl64, tmp_path / "md")))
    notes = "\n".join(params.notes)
    assert "fp16_type cbfloat16" in notes and "-> 69: the codon tokenizer's ids" in notes
    ignored = [n for n in params.notes if n.startswith("Model Zoo keys ignored")]
    assert len(ignored) == 1 and "data_processor" in ignored[0] and "persistent_workers" in ignored[0]


def test_two_training_steps_equal_the_native_runs(shards_msl64, tmp_path, one_thread):
    """The same losses, step for step, from each layout and from the equivalent native params."""
    for name, expected in (("gpt2_sectioned.yaml", gpt2_native), ("neox_trainer.yaml", neox_native)):
        theirs, ours = tmp_path / name / "theirs", tmp_path / name / "ours"
        theirs.mkdir(parents=True), ours.mkdir(parents=True)
        assert main(["CPU", "--params", str(fixture(name, theirs, shards_msl64))]) == 0
        assert main(["CPU", "--params", str(write_params(ours / "p.yaml", expected(shards_msl64, ours / "md")))]) == 0
        loss_theirs, loss_ours = (tensorboard_scalars(run / "md" / "train", "loss") for run in (theirs, ours))
        assert sorted(loss_theirs) == [1, 2] and loss_theirs == loss_ours
        log = (theirs / "md" / "run.log").read_text()
        assert log.count("Model Zoo keys ignored") == 1 and "data_processor" in log
        # the resolved params in model_dir are native: they load as they are
        assert not is_modelzoo_file(yaml.safe_load((theirs / "md" / "params_train.yaml").read_text()))


def test_bert_trainer_layout(shards_msl64, tmp_path):
    params = load_params(fixture("bert_trainer.yaml", tmp_path, shards_msl64))
    m, o, r = params.model, params.optimizer, params.runconfig
    assert (m.name, m.vocab_size, m.ffn_size, m.dropout_rate, m.mixed_precision, m.fp16_type) == \
        ("bert", 69, 64, 0.1, True, "float16")
    assert (o.optimizer_type, o.beta1, o.beta2, o.eps) == ("Adam", 0.9, 0.98, 1e-6)
    assert o.initial_loss_scale == o.min_loss_scale == o.max_loss_scale == 1024.0  # a static scale
    assert (params.train_input.mlm_probability, params.train_input.max_seq_length) == (0.2, 64)
    assert (r.max_steps, r.eval_frequency, r.eval_steps, r.checkpoint_steps, r.log_steps, r.seed) == (10, 5, 2, 5, 1, 1)
    # warm-up, then initial * scale / sqrt(max(step, warmup_steps)) counted from the phase's start
    assert learning_rate_at(2, o) == pytest.approx(0.0005)
    assert learning_rate_at(4 + 9, o) == pytest.approx(0.001 * 2.0 / 3.0)
    assert learning_rate_at(4 + 1, o) == pytest.approx(0.001 * 2.0 / 2.0)


def test_bert_classifier_with_our_label_keys(shards_msl64, tmp_path):
    labels = tmp_path / "labels.tsv"
    labels.write_text("strain\tclade\nWuhan/Hu-1/2019\t19A\nWuhan/WH01/2019\t19A\nAustralia/VIC05/2020\t19B\n")
    params = load_params(fixture("bert_classifier_sectioned.yaml", tmp_path, shards_msl64, labels))
    assert (params.model.name, params.model.num_labels, params.model.dropout_rate) == ("bert", 2, 0.1)
    assert params.train_input.labels_file == str(labels) and params.eval_input.label_column == "clade"
    assert [p.scheduler for p in params.optimizer.schedule_phases] == ["Linear", "Constant"]
    # without our label keys: each missing one, all at once
    unlabelled = fixture("bert_classifier_sectioned.yaml", tmp_path, shards_msl64, labels, edit=lambda text: "\n".join(
        line for line in text.splitlines() if "labels_file" not in line and "label_column" not in line))
    with pytest.raises(ConfigError) as e:
        load_params(unlabelled)
    assert [line.split(": ")[1] for line in str(e.value).splitlines()] == [
        "train_input.labels_file", "train_input.label_column", "eval_input.labels_file", "eval_input.label_column"]


def test_gptj_1x_steps_and_other_schedulers(shards_msl64, tmp_path):
    """1.x `steps` and `decay_steps`; Exponential, Step, Polynomial, MultiStep by the Model Zoo's formulas."""
    params = load_params(fixture("gptj_sectioned_1x.yaml", tmp_path, shards_msl64))
    assert (params.model.name, params.model.rotary_dim) == ("gptj", 2)
    assert (params.optimizer.optimizer_type, params.optimizer.momentum, params.optimizer.weight_decay) == \
        ("SGD", 0.9, 0.1)
    lr = [learning_rate_at(s, params.optimizer) for s in range(40)]
    assert lr[1] == pytest.approx(0.005)
    assert lr[2:10] == pytest.approx([0.01 * 0.5 ** (s // 4) for s in range(8)])          # staircase
    assert lr[10:16] == pytest.approx([0.0025 * 0.5 ** (s // 3) for s in range(6)])
    assert lr[16:26] == pytest.approx([0.0001 + 0.0009 * (1 - s / 10) ** 2 for s in range(10)])
    assert lr[26:36] == pytest.approx([1e-4 * 0.1 ** ((s >= 3) + (s >= 5)) for s in range(10)])


def test_piecewise_constant_and_exponential_2x(shards_msl64, tmp_path):
    def edit(text):
        return text.replace("""        - CosineDecayLR:
            initial_learning_rate: 0.002
            end_learning_rate: 0.0002
            total_iters: 10""", """        - ExponentialLR:
            initial_learning_rate: 0.002
            total_iters: 4
            decay_rate: 0.1
        - PiecewiseConstantLR:
            learning_rates: [0.003, 0.002, 0.001]
            milestones: [2, 5]""")
    params = load_params(fixture("neox_trainer.yaml", tmp_path, shards_msl64, edit=edit))
    lr = [learning_rate_at(s, params.optimizer) for s in range(14)]
    assert lr[2:6] == pytest.approx([0.002 * 0.1 ** (s / 4) for s in range(4)])
    assert lr[6:14] == pytest.approx([0.003] * 2 + [0.002] * 3 + [0.001] * 3)


def test_max_sequence_length_from_the_manifest_or_one_line(shards_msl64, tmp_path):
    params = load_params(fixture("gpt2_sectioned.yaml", tmp_path, shards_msl64))
    assert params.train_input.max_seq_length == params.eval_input.max_seq_length == 64
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True), (empty / "val").mkdir()
    with pytest.raises(ConfigError) as e:
        load_params(fixture("gpt2_sectioned.yaml", tmp_path, empty))
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and all("max_sequence_length is not given" in line for line in lines)


@pytest.fixture(scope="module")
def orf_packed_shards(tmp_path_factory) -> Path:
    """The three genomes read from their longest ORF's frame and packed: settings a Model Zoo file has no key for."""
    from data_preparation import prepare_genomes
    from tests.helpers import GENOMES
    out = tmp_path_factory.mktemp("orf_packed") / "data"
    assert prepare_genomes.main(["--input", str(GENOMES), "--output_dir", str(out), "--max_seq_length", "64",
                                 "--split", "0.67,0.33,0", "--reading_frame", "longest_orf", "--pack_sequences"]) == 0
    return out


def test_reading_frame_and_packing_follow_the_shards(orf_packed_shards, tmp_path, capsys):
    path = fixture("gpt2_sectioned.yaml", tmp_path, orf_packed_shards)
    params = load_params(path)
    for section, split in ((params.train_input, "train"), (params.eval_input, "val")):
        assert (section.max_seq_length, section.reading_frame, section.pack_sequences) == (64, "longest_orf", True)
        name = "train_input" if split == "train" else "eval_input"
        assert f"{name}: max_seq_length 64, reading_frame longest_orf, pack_sequences true, as the shards in " \
               f"{orf_packed_shards / split} were prepared (their manifest)" in params.notes
    assert main(["CPU", "--params", str(path), "--validate_only"]) == 0  # the shards open as the params say
    # a native file keeps naming them: its defaults (as_read, unpacked) are refused
    ours = tmp_path / "ours.yaml"
    assert convert_main(["--input", str(path), "--output", str(ours)]) == 0
    text = ours.read_text().replace("reading_frame: longest_orf", "reading_frame: as_read")
    ours.write_text(text.replace("pack_sequences: true", "pack_sequences: false"))
    capsys.readouterr()
    assert main(["CPU", "--params", str(ours), "--validate_only"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[2] for line in err] == ["train_input.pack_sequences", "train_input.reading_frame"], err


@pytest.mark.parametrize("name,spelled", [("gpt2_sectioned.yaml", "train_input.max_sequence_length"),
                                          ("neox_trainer.yaml", "trainer.fit.train_dataloader.max_sequence_length")])
def test_a_length_the_shards_contradict_names_the_files_key(name, spelled, shards_msl64, tmp_path):
    def edit(text):  # the first input section's batch_size gets a max_sequence_length beside it
        return re.sub(r"^( +)batch_size: 4$", r"\1batch_size: 4\n\1max_sequence_length: 32", text, 1, re.M)
    path = fixture(name, tmp_path, shards_msl64, edit=edit)
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert str(e.value) == (f"{path}: {spelled}: 32 does not match the shards in {shards_msl64 / 'train'}: prepare "
                            f"shards with --max_seq_length 32 into another directory, or set it to the shards' "
                            f"max_seq_length 64")


# ------------------------------------------------------------------ problems: all, one line each, in file order

def test_every_problem_at_once_in_file_order(shards_msl64, tmp_path):
    def edit(text):
        return (text.replace(f'        - "{shards_msl64}/train"', f'        - "{shards_msl64}/train"\n        - "{shards_msl64}/val"')
                    .replace('position_embedding_type: "learned"', 'position_embedding_type: "alibi"')
                    .replace("embedding_dropout_rate: 0.1", "embedding_dropout_rate: 0.2")
                    .replace("num_heads: 4", 'num_heads: "two"')
                    .replace('optimizer_type: "adamw"', 'optimizer_type: "lamb"')
                    .replace('scheduler: "CosineDecay"', 'scheduler: "CosineAnnealingWarmRestarts"')
                    .replace("seed: 3", "seed: 1180591620717411303424")  # 2**70
                    .replace("    num_wgt_servers: 2", "    num_wgt_servers: 2\n    hardware_knob: 1"))
    path = fixture("gpt2_sectioned.yaml", tmp_path, shards_msl64, edit=edit)
    with pytest.raises(ConfigError) as e:
        load_params(path)
    lines = str(e.value).splitlines()
    where = [line.split(": ")[1] for line in lines]
    assert where == ["train_input.data_dir", "model.position_embedding_type", "model.embedding_dropout_rate",
                     "model.num_heads", "optimizer.optimizer_type", "optimizer.learning_rate.1", "runconfig.seed",
                     "runconfig.hardware_knob"], lines
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert "2 directories" in lines[0] and "'alibi': gpt2 has position_embedding_type 'learned'" in lines[1]
    assert "embedding_dropout_rate 0.2, dropout_rate 0.1 differ" in lines[2]
    assert "'lamb' is not an optimizer" in lines[4] and "'CosineAnnealingWarmRestarts' is not supported" in lines[5]
    assert "less than or equal to 4294967295" in lines[6]
    assert lines[7].endswith("unknown key; not a Model Zoo key of runconfig (docs/modelzoo.md)")


def test_cli_prints_each_problem_on_its_own_line_and_exits_2(shards_msl64, tmp_path, capsys):
    def edit(text):
        return text.replace("hidden_size: 32", "hidden_size: 32\n      hiden_size: 3").replace(
            "max_steps: 2", "max_steps: 0")
    path = fixture("neox_trainer.yaml", tmp_path, shards_msl64, edit=edit)
    assert main(["CPU", "--params", str(path), "--validate_only"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {path}: trainer.init.model.hiden_size: unknown key; did you mean 'hidden_size'?",
                   f"error: {path}: trainer.init.loop.max_steps: Input should be greater than 0 (got 0)"]
    assert not (tmp_path / "md").exists()


def test_a_trainer_file_refuses_what_the_models_cannot_honour(shards_msl64, tmp_path):
    def edit(text):
        return (text.replace("use_bias_in_output: false", "use_bias_in_output: true")
                    .replace("rotary_dim: 2", "rotary_dim: 3")
                    .replace("nonlinearity: gelu", "nonlinearity: relu")
                    .replace("  validate_all:", "  predict:\n    x: 1\n  validate_all:"))
    with pytest.raises(ConfigError) as e:
        load_params(fixture("neox_trainer.yaml", tmp_path, shards_msl64, edit=edit))
    lines = str(e.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "trainer.init.model.nonlinearity", "trainer.init.model.rotary_dim", "trainer.init.model.use_bias_in_output",
        "trainer.predict"], lines
    text = "\n".join(lines)
    assert "'relu': the models compute GELU" in text and "gpt_neox has use_bias_in_output False" in text
    assert "trainer.predict: unknown key" in text and "rotary_dim: 3: must be an even number in 2..head_dim (8)" in text


def test_sparsity_section(shards_msl64, tmp_path):
    """The Model Zoo's RigL block: sparsity is the fraction pruned, ours density the fraction kept."""
    def edit(text):
        return text.replace("runconfig:\n", """sparsity:
    sparsity: 0.75
    init_method: "random"
    algorithm: "rigl"
    drop_fraction:
      type: "cosine"
      init: 0.3
      half_period: 30
    update:
      freq: 10
      stop: 30
    param_filter:
      - "*proj_[qkv]_dense_layer.weight"

runconfig:
""")
    params = load_params(fixture("gpt2_sectioned.yaml", tmp_path, shards_msl64, edit=edit))
    s = params.sparsity
    assert (s.algorithm, s.density, s.init_method, s.drop_fraction, s.update_frequency, s.end_step) == \
        ("rigl", 0.25, "random", 0.3, 10, 30)
    assert "sparsity.param_filter" in params.notes[0]


def test_load_checkpoint_states_callback(shards_msl64, tmp_path):
    def edit(text):
        return text.replace("    - ComputeNorm: {}", "    - ComputeNorm: {}\n    - LoadCheckpointStates:\n"
                                                    "        load_checkpoint_states: [model]")
    assert load_params(fixture("neox_trainer.yaml", tmp_path, shards_msl64, edit=edit)).runconfig.checkpoint_states \
        == {"model"}


# ------------------------------------------------------------------ hints name the mapped key, never a look-alike

@pytest.mark.parametrize("section,key,hint", [
    ("runconfig", "loss_scaling_factor", "did you mean optimizer.initial_loss_scale, optimizer.min_loss_scale, "
                                         "optimizer.max_loss_scale? (the Model Zoo's optimizer.loss_scaling_factor)"),
    ("model", "betas", "did you mean optimizer.beta1, optimizer.beta2? (the Model Zoo's optimizer.betas)"),
    ("optimizer", "max_sequence_length", "did you mean train_input.max_seq_length? (the Model Zoo's "
                                         "train_input.max_sequence_length)"),
    ("optimizer", "num_wgt_servers", "the Model Zoo's runconfig.num_wgt_servers (noted"),
])
def test_a_native_file_hints_the_mapped_key(section, key, hint, shards_msl64, tmp_path):
    from tests.helpers import tiny_params
    raw = tiny_params(shards_msl64, tmp_path / "md")
    raw[section][key] = 1
    with pytest.raises(ConfigError) as e:
        validate_params(raw, "p.yaml")
    assert str(e.value).startswith(f"p.yaml: {section}.{key}: unknown key; ") and hint in str(e.value), str(e.value)


def test_no_spelling_guess_for_unrelated_keys():
    from modelzoo.config import RunConfig, closest_key
    assert closest_key("num_wgt_servers", list(RunConfig.model_fields)) is None
    assert closest_key("max_step", list(RunConfig.model_fields)) == "max_steps"


# ------------------------------------------------------------------ the table and its docs

def test_docs_modelzoo_is_generated_from_the_table():
    """docs/modelzoo.md must be regenerated (python -m modelzoo.modelzoo_params > docs/modelzoo.md)."""
    assert (REPO / "docs" / "modelzoo.md").read_text() == reference_markdown()


def test_every_rule_has_a_fate_and_mapped_rules_name_real_keys():
    from modelzoo.modelzoo_params.translate import NATIVE
    for (part, key), rule in RULES.items():
        assert rule.fate in ("mapped", "noted", "refused"), key
        assert rule.fate == "mapped" or rule.meaning, key
        for ours in filter(None, (o.strip() for o in rule.ours.split(","))):
            section, _, name = ours.rpartition(".")
            section = section or part
            if section in NATIVE:
                assert name in NATIVE[section].model_fields, (part, key, ours)


def test_native_files_are_not_translated(shards_msl64, tmp_path):
    from tests.helpers import tiny_params
    assert not is_modelzoo_file(tiny_params(shards_msl64, tmp_path))
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        assert not is_modelzoo_file(yaml.safe_load(path.read_text())), path


def test_codon_vocab_size_is_the_tokenizers():
    from modelzoo.config import CODON_VOCAB_SIZE
    from modelzoo.data.tokenizer import CodonTokenizer
    assert CodonTokenizer().vocab_size == CODON_VOCAB_SIZE


def test_rotary_dim_becomes_rotary_pct_exactly(shards_msl64, tmp_path):
    """int(head_dim * rotary_pct) gives back rotary_dim even where rotary_dim / head_dim is inexact."""
    def edit(text):
        return text.replace("hidden_size: 32", "hidden_size: 192").replace("num_heads: 4", "num_heads: 4") \
            .replace("rotary_dim: 2", "rotary_dim: 10")  # head_dim 48: 10 / 48 * 48 = 9.999...
    params = load_params(fixture("neox_trainer.yaml", tmp_path, shards_msl64, edit=edit))
    assert int(params.model.head_dim * params.model.rotary_pct) == 10 and math.isclose(params.model.rotary_pct, 10 / 48)


# ------------------------------------------------------------------ hostile or broken values: one line each, never a traceback

ODD_VALUES = [None, -1, 2**70, 0.5, float("nan"), "x", "a\0b", [], [1], {}, {"a": 1}, True, [{"LinearLR": 5}],
              "LoadCheckpointStates", ["LoadCheckpointStates"], {"AdamW": 5}, {3: 4}]


def _paths(node, prefix=()):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.yaml")))
def test_mutated_modelzoo_files_fail_in_lines_not_tracebacks(name, shards_msl64, tmp_path):
    import copy
    import random
    rng = random.Random(name)
    base = yaml.safe_load(fixture(name, tmp_path, shards_msl64, tmp_path / "labels.tsv").read_text())
    paths = list(_paths(base))
    for trial in range(40):
        raw = copy.deepcopy(base)
        for path in rng.sample(paths, 2):
            parent = raw
            try:  # an earlier mutation may have replaced a part of this path
                for part in path[:-1]:
                    parent = parent[part]
                parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
            except (KeyError, IndexError, TypeError):
                pass
        path = write_params(tmp_path / f"m{trial}.yaml", raw)
        try:
            load_params(path)
        except ConfigError as e:
            assert all(line.startswith(f"{path}: ") for line in str(e).splitlines()), str(e)


@pytest.mark.parametrize("given,flags,ours", [
    ("gpt3", {}, "gpt2"), ("gpt2", {}, "gpt2"), ("gptj", {}, "gptj"),
    ("gptj", {"use_untied_layer_norm": True}, "gpt_neox"), ("gpt_neox", {}, "gpt_neox"), ("bert", {}, "bert"),
    (None, {"position_embedding_type": "rotary"}, "gptj"),
    (None, {"position_embedding_type": "rotary", "use_untied_layer_norm": True}, "gpt_neox"),
    (None, {"encoder_nonlinearity": "gelu"}, "bert"), (None, {}, "gpt2"),
])
def test_model_names(given, flags, ours):
    from modelzoo.modelzoo_params import translate
    model = {"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 4, "max_position_embeddings": 64, **flags}
    if given:
        model["name"] = given
    t = translate({"model": model}, "p.yaml")
    assert t.params["model"]["name"] == ours and not t.problems
    assert (f"model.name not given (a sectioned Model Zoo file): {ours}, from the model's keys" in t.notes) == \
        (given is None)
