import copy
from pathlib import Path

import pytest

from modelzoo.config import load_params, reference_markdown, validate_params
from modelzoo.errors import ConfigError
from tests.helpers import tiny_params, write_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw(shards_msl64, tmp_path):
    return tiny_params(shards_msl64, tmp_path / "md")


def error_of(raw, mutate) -> str:
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(ConfigError) as e:
        validate_params(bad, "p.yaml")
    message = str(e.value)
    assert "\n" not in message
    return message


def test_valid_params_and_defaults(raw):
    params = validate_params(raw, "p.yaml")
    assert params.model.ffn_size == 4 * 32
    assert params.runconfig.checkpoint_states == {"model", "optimizer", "scheduler", "dataloader", "rng"}


@pytest.mark.parametrize("section,key,expected", [
    ("model", "hiden_size", "model.hiden_size: unknown key; did you mean 'hidden_size'?"),
    ("train_input", "batch_sise", "train_input.batch_sise: unknown key; did you mean 'batch_size'?"),
    ("runconfig", "max_step", "runconfig.max_step: unknown key; did you mean 'max_steps'?"),
    ("optimizer", "learning_rte", "optimizer.learning_rte: unknown key; did you mean 'learning_rate'?"),
])
def test_unknown_key_names_file_section_key_and_closest(raw, section, key, expected):
    assert error_of(raw, lambda r: r[section].update({key: 1})) == f"p.yaml: {expected}"


def test_unknown_key_inside_a_schedule_phase(raw):
    msg = error_of(raw, lambda r: r["optimizer"]["learning_rate"][1].update(inital_learning_rate=1))
    assert msg.endswith("optimizer.learning_rate.1.inital_learning_rate: unknown key; did you mean 'initial_learning_rate'?")


def test_wrong_type(raw):
    msg = error_of(raw, lambda r: r["train_input"].update(batch_size="eight"))
    assert "train_input.batch_size" in msg and "'eight'" in msg


def test_missing_data_dir(raw):
    msg = error_of(raw, lambda r: r["train_input"].update(data_dir="/no/such/dir"))
    assert "train_input.data_dir" in msg and "does not exist" in msg


def test_sequence_longer_than_positions(raw):
    msg = error_of(raw, lambda r: r["eval_input"].update(max_seq_length=65))
    assert "eval_input.max_seq_length: 65 is above model.max_position_embeddings (64)" in msg


def test_heads_must_divide_hidden(raw):
    assert "num_heads (5) must divide hidden_size (32)" in error_of(raw, lambda r: r["model"].update(num_heads=5))


def test_unknown_scheduler(raw):
    msg = error_of(raw, lambda r: r["optimizer"].update(learning_rate={"scheduler": "Cosine"}))
    assert "optimizer.learning_rate" in msg and "'Cosine'" in msg


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: gpt2\n  hidden_size: [32\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: invalid yaml"):
        load_params(path)


def test_cli_overrides_beat_yaml(raw, tmp_path):
    path = write_params(tmp_path / "p.yaml", raw)
    params = load_params(path, {"max_steps": 42, "seed": 7, "model_dir": None})
    assert params.runconfig.max_steps == 42 and params.runconfig.seed == 7
    assert params.runconfig.model_dir == raw["runconfig"]["model_dir"]


def test_params_reference_is_generated_from_the_schema():
    """docs/params.md must be regenerated (python -m modelzoo.config > docs/params.md) when keys change."""
    assert (ROOT / "docs" / "params.md").read_text() == reference_markdown()


@pytest.mark.parametrize("mutate,expected", [
    (lambda r: r["runconfig"].update(seed=2**70), "runconfig.seed: Input should be less than or equal to 4294967295"),
    (lambda r: r["runconfig"].update(seed=-1), "runconfig.seed: Input should be greater than or equal to 0"),
    (lambda r: r["train_input"].update(shuffle_seed=-1), "train_input.shuffle_seed: Input should be greater than or "
                                                         "equal to 0"),
    (lambda r: r["model"].update(vocab_size=5), "model.vocab_size: 5 is below the codon tokenizer's 69 ids"),
    (lambda r: r["runconfig"].update(model_dir="md\0x"), "runconfig.model_dir: a path cannot contain a NUL byte"),
    (lambda r: r["eval_input"].update(data_dir="d\0"), "eval_input.data_dir: a path cannot contain a NUL byte"),
    (lambda r: r["model"].update(num_heads="two"), "model.num_heads: Input should be a valid integer, unable to "
                                                   "parse string as an integer (got 'two')"),
])
def test_bad_values_are_one_line(raw, mutate, expected):
    assert error_of(raw, mutate).startswith(f"p.yaml: {expected}")


def test_seed_flag_too_large_is_one_line_exit_2(raw, tmp_path, capsys):
    from modelzoo.cli import main
    path = write_params(tmp_path / "p.yaml", raw)
    assert main(["CPU", "--params", str(path), "--validate_only", "--seed", str(2**64)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {path}: runconfig.seed: Input should be less than or equal to 4294967295 "
                   f"(got 18446744073709551616)"]


def test_every_problem_of_a_native_file_in_file_order(raw, tmp_path):
    raw["model"].update(num_heads="two", hiden_size=3)
    raw["train_input"].update(data_dir=str(tmp_path / "missing"), batch_size=0)
    raw["runconfig"].update(max_step=4)
    with pytest.raises(ConfigError) as e:
        load_params(write_params(tmp_path / "p.yaml", raw))
    lines = [line.split(": ", 2)[1:] for line in str(e.value).splitlines()]
    assert [where for where, _ in lines] == ["train_input.data_dir", "train_input.batch_size", "model.num_heads",
                                             "model.hiden_size", "runconfig.max_step"]
    assert "does not exist" in lines[0][1] and lines[4][1] == "unknown key; did you mean 'max_steps'?"


@pytest.mark.parametrize("device,memory", [("CPU", {"device_memory_gb": 1e-6}), ("GPU", {"device_memory_gb": 1e-6}),
                                           ("CSX", {"csx": {"wafer_memory_gb": 1e-6}})])
def test_compile_only_refuses_a_plan_that_does_not_fit_on_every_backend(raw, tmp_path, capsys, device, memory):
    from modelzoo.cli import main
    raw["runconfig"].update(memory)
    assert main([device, "--params", str(write_params(tmp_path / "p.yaml", raw)), "--compile_only"]) == 2
    err = capsys.readouterr().err.splitlines()
    refusal = "runconfig.csx.wafer_memory_gb: stage 1 GPT2Block needs" if device == "CSX" else \
        "--compile_only: does not fit with these params; no setting fits"
    assert len(err) == 1 and err[0].startswith(f"error: {refusal}")


def test_model_sizes_past_any_trainable_model_are_one_line(raw):
    """Sizes whose weights' element counts would overflow, or whose model would take for ever to build."""
    for key, value in (("hidden_size", 2**64), ("num_hidden_layers", 2**20), ("max_position_embeddings", 2**70),
                       ("filter_size", 2**40), ("vocab_size", 2**64), ("num_heads", 2**64)):
        assert error_of(raw, lambda r: r["model"].update({key: value})).startswith(
            f"p.yaml: model.{key}: Input should be less than or equal to ")


# ---------------------------------------------------------------- the params against their shards

def test_settings_the_shards_contradict_are_lines_naming_the_key_before_anything_is_built(raw, tmp_path, capsys):
    from modelzoo.cli import main
    raw["train_input"].update(max_seq_length=32, reading_frame="longest_orf", pack_sequences=True)
    raw["eval_input"].update(reading_frame="longest_orf")  # as train_input's (a cross-section rule)
    path = write_params(tmp_path / "p.yaml", raw)
    assert main(["CPU", "--params", str(path)]) == 2
    shards = raw["train_input"]["data_dir"]
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: train_input.max_seq_length: 32 does not match the shards in {shards}: prepare shards with "
        f"--max_seq_length 32 into another directory, or set it to the shards' max_seq_length 64",
        f"error: {path}: train_input.reading_frame: reading_frame is longest_orf but the shards in {shards} were "
        f"prepared with reading_frame as_read (prepare_genomes --reading_frame): set it to as_read, or prepare "
        f"longest_orf shards into another directory",
        f"error: {path}: train_input.pack_sequences: true but the shards in {shards} are not packed: set it to false, "
        f"or prepare packed shards (prepare_genomes --pack_sequences) into another directory"]
    assert not (tmp_path / "md").exists()
    # the mode decides which sections are read
    assert main(["CPU", "--params", str(path), "--mode", "eval", "--validate_only"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: eval_input.reading_frame: reading_frame is longest_orf")


@pytest.mark.parametrize("laid_out", ["by ShardWriter", "as one json line"])
def test_manifest_fields_read_the_head_and_tail_only(shards_msl64, tmp_path, monkeypatch, laid_out):
    import json
    import shutil

    from modelzoo.data import shards
    from modelzoo.data.datasets import shard_settings
    data_dir = tmp_path / "train"
    shutil.copytree(shards_msl64 / "train", data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    if laid_out != "by ShardWriter":
        (data_dir / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(shards, "PARSE_WHOLE_BYTES", 0)  # as a manifest of millions of records is read
    fields = shards.manifest_fields(data_dir)
    records = manifest.pop("records")
    assert {k: v for k, v in fields.items() if k != "records"} == manifest
    assert ("records" in fields) == (laid_out != "by ShardWriter") and records["table"]["shape"] == [2, 3]
    assert shard_settings(fields) == {"max_seq_length": 64, "reading_frame": "as_read", "pack_sequences": False}
    assert shards.manifest_fields(tmp_path) is None


def test_a_transformers_config_of_the_wrong_type_is_one_line(raw):
    from modelzoo.models import hf
    config_json = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": "two", "n_positions": 64,
                   "vocab_size": 69, "n_inner": None, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
    params = validate_params(raw, "p.yaml")
    with pytest.raises(ConfigError) as e:
        hf.check_matches(params.model, hf.model_fields_from_hf(config_json, "hf/config.json"), "hf/config.json")
    assert str(e.value) == ("hf/config.json: describes a network this toolkit cannot build: model.num_heads: Input "
                            "should be a valid integer, unable to parse string as an integer (got 'two')")


@pytest.mark.parametrize("memoryx", ["ram", "disk"])
def test_csx_refuses_a_memoryx_this_host_cannot_hold(raw, tmp_path, capsys, monkeypatch, memoryx):
    """--compile_only and a run alike: one line naming the figure, exit 2, nothing written."""
    import shutil
    from collections import namedtuple

    import torch

    from modelzoo.backends import memory_plan
    from modelzoo.cli import main
    from modelzoo.models import build_model
    with torch.device("meta"):
        model = build_model(validate_params(raw, "p.yaml").model)
    n = sum(p.numel() for p in model.parameters())
    need = 4 * n * 4  # fp32 weights, gradients and AdamW's two state tensors
    raw["runconfig"]["csx"] = {"memoryx": memoryx, "memoryx_dir": str(tmp_path / "mx")}
    path = write_params(tmp_path / "p.yaml", raw)
    if memoryx == "ram":  # the host's RAM holds the MemoryX only under 90% of it
        monkeypatch.setattr(memory_plan, "device_memory_bytes", lambda device, configured: int(need / 0.9) + 1)
        assert main(["CSX", "--params", str(path), "--compile_only"]) == 0
        monkeypatch.setattr(memory_plan, "device_memory_bytes", lambda device, configured: int(need / 0.9) - 1)
        expected = (f"error: {path}: runconfig.csx.memoryx: ram: the MemoryX needs {memory_plan.size_text(need)} "
                    f"(fp32 weights, gradients, optimizer state) but this host has "
                    f"{memory_plan.size_text(int(need / 0.9) - 1)} of RAM (fits: within 90% of it); use "
                    f"runconfig.csx.memoryx: disk (files under runconfig.csx.memoryx_dir)")
    else:  # memoryx_dir does not exist yet: the free space of its parent's filesystem
        usage = namedtuple("usage", "total used free")

        def disk_usage(where):
            return usage(need, 0, need - 1 if str(where) == str(tmp_path) else 0)
        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        expected = (f"error: {path}: runconfig.csx.memoryx_dir: disk: the MemoryX needs {memory_plan.size_text(need)} "
                    f"(fp32 weights, gradients, optimizer state) but the filesystem of {tmp_path} has "
                    f"{memory_plan.size_text(need - 1)} free; free space there or point runconfig.csx.memoryx_dir at "
                    f"a larger disk")
    capsys.readouterr()
    for flags in (["--compile_only"], []):
        assert main(["CSX", "--params", str(path), *flags]) == 2
        assert capsys.readouterr().err.splitlines() == [expected]
    assert not (tmp_path / "md").exists() and not (tmp_path / "mx").exists()
    assert main(["CSX", "--params", str(path), "--validate_only"]) == 0  # params valid anywhere; the plan is the host's
