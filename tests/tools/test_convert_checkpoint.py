"""python -m modelzoo.tools.convert_checkpoint: export to transformers, import back bit for bit,
resume training from the import, fine-tune a classifier from an MLM checkpoint, clear errors."""

import copy
import re

import pytest
import torch

from modelzoo.models import MODELS
from modelzoo.tools import convert_checkpoint
from modelzoo.training import checkpoint as ckpt
from tests.helpers import convert, tiny_params, train_cpu, write_params

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def params_for(name, shards, model_dir, tmp_path, **model):
    raw = tiny_params(shards, model_dir, max_steps=2, checkpoint_steps=0)
    raw["model"].update(name=name, **model)
    return raw, write_params(tmp_path / f"{name}_{model_dir.name}.yaml", raw)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_import_round_trip_is_bit_exact_and_training_resumes(name, shards_msl64, tmp_path, capsys):
    _, params = params_for(name, shards_msl64, tmp_path / "trained", tmp_path)
    train_cpu(capsys, params)
    code, out = convert(capsys, "--to", "hf", "--model_dir", tmp_path / "trained", "--output_dir", tmp_path / "hf")
    assert code == 0, out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in (tmp_path / "hf").iterdir()}
    twin = transformers.AutoModel.from_pretrained(tmp_path / "hf")  # loads as a transformers model
    assert twin.config.model_type == name

    code, out = convert(capsys, "--from", "hf", "--input_dir", tmp_path / "hf", "--params", params,
                        "--model_dir", tmp_path / "imported")
    assert code == 0, out
    original = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "trained", 2))["model"]
    imported = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "imported", 0))["model"]
    assert original.keys() == imported.keys()
    for key in original:
        assert original[key].dtype == imported[key].dtype and torch.equal(original[key], imported[key]), key

    out = train_cpu(capsys, params, "--model_dir", tmp_path / "imported", "--num_steps", 1)
    assert "checkpoint_0.mdl (states: dataloader,model,optimizer,rng,scheduler) at step 0" in out
    assert ckpt.checkpoint_path(tmp_path / "imported", 1).is_file()


def test_classifier_fine_tunes_from_mlm_and_exports_with_class_names(shards_msl64, tmp_path, capsys):
    labels = tmp_path / "labels.tsv"
    labels.write_text("strain\tclade\nWuhan/Hu-1/2019\t19A\nWuhan/WH01/2019\t19A\nAustralia/VIC05/2020\t19B\n")
    _, mlm = params_for("bert", shards_msl64, tmp_path / "mlm", tmp_path)
    train_cpu(capsys, mlm)
    raw, classifier = params_for("bert", shards_msl64, tmp_path / "cls", tmp_path, num_labels=2)
    for section in ("train_input", "eval_input"):
        raw[section].update(labels_file=str(labels), id_column="strain", label_column="clade")
    write_params(classifier, raw)
    log = train_cpu(capsys, classifier, "--checkpoint_path", ckpt.checkpoint_path(tmp_path / "mlm", 2),
                "--load_checkpoint_states", "model", "--num_steps", 1)
    assert "new head tensors head.classifier.bias" in log and "not used: head.bias" in log
    # the new model_dir's run.log says where the run started, though it was created after that
    assert f"loaded {ckpt.checkpoint_path(tmp_path / 'mlm', 2)}" in (tmp_path / "cls" / "run.log").read_text()

    code, out = convert(capsys, "--to", "hf", "--model_dir", tmp_path / "cls", "--output_dir", tmp_path / "hf")
    assert code == 0 and "BertForSequenceClassification" in out
    twin = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert twin.config.id2label == {0: "19A", 1: "19B"}


def test_refusals_are_one_line_with_exit_code_2(shards_msl64, tmp_path, capsys):
    raw, params = params_for("gptj", shards_msl64, tmp_path / "trained", tmp_path)
    code, out = convert(capsys, "--to", "hf", "--model_dir", tmp_path / "trained", "--output_dir", tmp_path / "o")
    assert code == 2 and "no checkpoint to export" in out and out.count("\n") == 1
    train_cpu(capsys, params)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    code, out = convert(capsys, "--to", "hf", "--model_dir", tmp_path / "trained", "--output_dir", tmp_path / "full")
    assert code == 2 and "exists and is not empty" in out and (tmp_path / "full" / "x").read_text() == "keep me"
    assert convert(capsys, "--to", "hf", "--model_dir", tmp_path / "trained", "--output_dir", tmp_path / "hf")[0] == 0

    wider = copy.deepcopy(raw)
    wider["model"]["hidden_size"] = 64
    other = write_params(tmp_path / "wider.yaml", wider)
    code, out = convert(capsys, "--from", "hf", "--input_dir", tmp_path / "hf", "--params", other,
                        "--model_dir", tmp_path / "new")
    assert code == 2 and "hidden_size is 32 but the params say model.hidden_size: 64" in out
    assert not (tmp_path / "new").exists()  # nothing written
    code, out = convert(capsys, "--from", "hf", "--input_dir", tmp_path / "hf", "--params", params,
                        "--model_dir", tmp_path / "trained")
    assert code == 2 and "already holds checkpoints" in out
    code, out = convert(capsys, "--from", "hf", "--input_dir", tmp_path / "nowhere", "--params", params,
                        "--model_dir", tmp_path / "new")
    assert code == 2 and "no config.json" in out
    with pytest.raises(SystemExit) as e:
        convert_checkpoint.main(["--to", "hf", "--model_dir", str(tmp_path / "trained")])
    assert e.value.code == 2 and "--to hf needs --output_dir" in capsys.readouterr().err


def test_help_documents_both_directions(capsys):
    with pytest.raises(SystemExit):
        convert_checkpoint.main(["--help"])
    text = capsys.readouterr().out
    assert "--to hf --model_dir" in text and "--from hf --input_dir" in text


@pytest.mark.parametrize("change,message", [
    ({"activation_function": "relu"}, "activation_function 'relu' is not supported (need 'gelu_new')"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings False is not supported (need True)"),
    ({"model_type": "llama"}, "model_type 'llama' is not supported; convertible: gpt2, gptj, gpt_neox, bert"),
])
def test_import_refuses_transformers_variants_we_do_not_build(change, message):
    from modelzoo.errors import ConfigError
    from modelzoo.models.hf import model_fields_from_hf

    config = {"model_type": "gpt2", "n_head": 2, "n_embd": 16, "n_layer": 1, "vocab_size": 69,
              "n_positions": 8, "layer_norm_epsilon": 1e-5}
    assert model_fields_from_hf(config, "c.json")["hidden_size"] == 16
    with pytest.raises(ConfigError, match="^" + re.escape(f"c.json: {message}")):
        model_fields_from_hf({**config, **change}, "c.json")
    with pytest.raises(ConfigError, match="c.json: no 'n_head'"):
        model_fields_from_hf({k: v for k, v in config.items() if k != "n_head"}, "c.json")


def _checkpoint_of(model_dir, **model):
    """checkpoint_0 of a fresh tiny model (no training needed to test a conversion)."""
    from modelzoo.config import validate_params
    from modelzoo.models import build_model
    params = validate_params({"model": {"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2,
                                        "max_position_embeddings": 16, **model},
                              "runconfig": {"model_dir": str(model_dir)}}, check_paths=False)
    torch.manual_seed(0)
    return convert_checkpoint._write_imported(params, build_model(params.model).state_dict(), "test")


def test_hf_export_for_transformers_4_and_back_from_pytorch_model_bin(tmp_path, capsys):
    """transformers 4.x (GenSLM's fork) reads rotary_pct / rotary_emb_base and pytorch_model.bin;
    without them it would silently take rotary_pct 0.25."""
    import json
    import shutil
    _checkpoint_of(tmp_path / "md", name="gpt_neox", rotary_pct=0.5, rotary_emb_base=500.0)
    code, out = convert(capsys, "--to", "hf", "--model_dir", tmp_path / "md", "--output_dir", tmp_path / "hf",
                        "--pytorch_bin")
    assert code == 0, out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rotary_pct"] == config["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert config["rotary_emb_base"] == config["rope_parameters"]["rope_theta"] == 500.0
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").rope_parameters["partial_rotary_factor"] == 0.5
    safetensors_state = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    bin_state = torch.load(tmp_path / "hf" / "pytorch_model.bin", weights_only=True)
    assert "embed_out.weight" in bin_state  # transformers 4.x's name
    assert torch.equal(bin_state["embed_out.weight"], safetensors_state["lm_head.weight"])

    only_bin = tmp_path / "only_bin"
    shutil.copytree(tmp_path / "hf", only_bin)
    (only_bin / "model.safetensors").unlink()
    _, params = params_for_model_dir(tmp_path, "gpt_neox", rotary_pct=0.5, rotary_emb_base=500.0)
    code, out = convert(capsys, "--from", "hf", "--input_dir", only_bin, "--params", params,
                        "--model_dir", tmp_path / "back")
    assert code == 0, out
    original = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "md", 0))["model"]
    back = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "back", 0))["model"]
    assert all(torch.equal(original[k], back[k]) for k in original)


def params_for_model_dir(tmp_path, name, **model):
    raw = {"model": {"name": name, "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2,
                     "max_position_embeddings": 16, **model}, "runconfig": {"model_dir": str(tmp_path / "unused")}}
    return raw, write_params(tmp_path / f"{name}_only_model.yaml", raw)


@pytest.mark.parametrize("case,message", [
    ("config_list", "config.json: config.json must be a JSON object, not a list"),
    ("config_bad_json", "config.json: invalid JSON"),
    ("index_bad_json", "model.safetensors.index.json: invalid JSON"),
    ("index_list", "model.safetensors.index.json: model.safetensors.index.json must be a JSON object, not a list"),
    ("index_no_map", "model.safetensors.index.json: no 'weight_map' object"),
    ("index_escapes", "weight_map names '../outside.safetensors', not a file name in"),
    ("index_missing_shard", "weight_map names shard-1.safetensors, which"),
    ("index_not_string", "weight_map names 7, not a file name in"),
    ("index_list_value", "weight_map names ['x'], not a file name in"),
])
def test_malformed_transformers_directories_are_one_line(case, message, tmp_path, capsys):
    import json
    _checkpoint_of(tmp_path / "md", name="gpt2")
    assert convert(capsys, "--to", "hf", "--model_dir", tmp_path / "md", "--output_dir", tmp_path / "hf")[0] == 0
    hf_dir = tmp_path / "hf"
    index = hf_dir / "model.safetensors.index.json"
    if case.startswith("index"):
        (hf_dir / "model.safetensors").rename(hf_dir / "shard-0.safetensors")
    content = {"config_list": [1, 2], "config_bad_json": "{nope", "index_bad_json": "{nope", "index_list": [],
               "index_no_map": {"metadata": {}},
               "index_escapes": {"weight_map": {"a": "../outside.safetensors"}},
               "index_missing_shard": {"weight_map": {"a": "shard-0.safetensors", "b": "shard-1.safetensors"}},
               "index_not_string": {"weight_map": {"a": 7}}, "index_list_value": {"weight_map": {"a": ["x"]}}}[case]
    target = hf_dir / "config.json" if case.startswith("config") else index
    target.write_text(content if isinstance(content, str) else json.dumps(content))
    _, params = params_for_model_dir(tmp_path, "gpt2")
    code, out = convert(capsys, "--from", "hf", "--input_dir", hf_dir, "--params", params,
                        "--model_dir", tmp_path / "new")
    assert code == 2 and out.count("\n") == 1 and message in out, out
    assert not (tmp_path / "new").exists()


def test_a_config_key_of_the_wrong_type_is_one_line():
    from modelzoo.errors import ConfigError
    from modelzoo.models.hf import model_fields_from_hf
    config = {"model_type": "gpt_neox", "vocab_size": 69, "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 16, "layer_norm_eps": 1e-5}
    assert model_fields_from_hf(config, "c.json")["hidden_size"] == 32
    with pytest.raises(ConfigError, match=r"^c\.json: malformed gpt_neox config \(AttributeError"):
        model_fields_from_hf({**config, "rope_parameters": [0.5]}, "c.json")
    with pytest.raises(ConfigError, match=r"^c\.json: malformed gpt_neox config \((TypeError|ValueError)"):
        model_fields_from_hf({**config, "rotary_pct": [0.5]}, "c.json")
