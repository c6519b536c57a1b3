"""python -m modelzoo.tools.convert_params: a Model Zoo file written in this toolkit's layout,
every default filled in, each ignored key commented; it loads to the same params."""

import yaml

from modelzoo.config import load_params
from modelzoo.tools.convert_params import main
from tests.helpers import modelzoo_fixture


def test_converted_file_loads_to_the_same_params_with_comments(shards_msl64, tmp_path, capsys):
    source = modelzoo_fixture("neox_trainer.yaml", tmp_path, shards_msl64)
    out = tmp_path / "ours.yaml"
    assert main(["--input", str(source), "--output", str(out)]) == 0
    text = out.read_text()
    assert load_params(out).model_dump() == load_params(source).model_dump()
    written = yaml.safe_load(text)
    assert written["runconfig"]["csx"]["wafer_memory_gb"] == 40.0  # defaults filled in
    assert written["model"]["attention_in_fp32"] == "auto" and written["model"]["vocab_size"] == 69
    assert "  # ignored: trainer.fit.train_dataloader.data_processor: GptHDF5MapDataProcessor (text data" in text
    assert "# ignored: trainer.init.backend (the device is run.py's first argument" in text
    assert "# note: vocab_size 50277 -> 69" in text
    assert capsys.readouterr().out.startswith(f"wrote {out}: gpt_neox")


def test_outputs_are_replaced_only_with_overwrite_and_only_its_own(shards_msl64, tmp_path, capsys):
    source = modelzoo_fixture("gpt2_sectioned.yaml", tmp_path, shards_msl64)
    out = tmp_path / "ours.yaml"
    assert main(["--input", str(source), "--output", str(out)]) == 0
    first = out.read_text()
    assert main(["--input", str(source), "--output", str(out)]) == 2
    assert main(["--input", str(source), "--output", str(out), "--overwrite"]) == 0 and out.read_text() == first
    users = tmp_path / "mine.yaml"
    users.write_text("my notes\n")
    assert main(["--input", str(source), "--output", str(users), "--overwrite"]) == 2
    assert users.read_text() == "my notes\n"
    assert main(["--input", str(source), "--output", str(source), "--overwrite"]) == 2  # its own input
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: --output ") for line in err)


def test_bad_or_native_input_writes_nothing(shards_msl64, tmp_path, capsys):
    bad = modelzoo_fixture("gpt2_sectioned.yaml", tmp_path, shards_msl64,
                           edit=lambda t: t.replace('optimizer_type: "adamw"', 'optimizer_type: "lamb"'))
    out = tmp_path / "ours.yaml"
    assert main(["--input", str(bad), "--output", str(out)]) == 2
    assert main(["--input", str(out.with_name("none.yaml")), "--output", str(out)]) == 2
    native = tmp_path / "native.yaml"
    native.write_text("model: {name: gpt2, hidden_size: 32, num_hidden_layers: 1, num_heads: 4, "
                      "max_position_embeddings: 64}\n")
    assert main(["--input", str(native), "--output", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "optimizer.optimizer_type: 'lamb' is not an optimizer" in err[0]
    assert "params file not found" in err[1] and "already this toolkit's layout" in err[2]
    assert not out.exists() and list(tmp_path.glob(".ours*")) == []
