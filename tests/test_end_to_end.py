"""The whole path through run.py's CLI on a tiny GPT-2: train, checkpoint, resume, evaluate."""

import re

import pytest
import torch

from modelzoo.cli import main
from tests.helpers import tensorboard_scalars, tiny_params, write_params


def test_train_resume_and_evaluate(shards_msl64, tmp_path, capsys):
    model_dir = tmp_path / "md"
    params = write_params(tmp_path / "p.yaml", tiny_params(shards_msl64, model_dir, mode="train_and_eval"))
    assert main(["CPU", "--params", str(params)]) == 0

    for name in ("checkpoint_3.mdl", "checkpoint_6.mdl", "params_train_and_eval.yaml", "run.log"):
        assert (model_dir / name).is_file(), name
    train_loss = tensorboard_scalars(model_dir / "train", "loss")
    assert sorted(train_loss) == [1, 2, 3, 4, 5, 6]
    for tag in ("lr", "grad_norm", "samples_per_sec", "tokens_per_sec"):
        assert len(tensorboard_scalars(model_dir / "train", tag)) == 6
    eval_ppl = tensorboard_scalars(model_dir / "eval", "perplexity")
    assert list(eval_ppl) == [6] and 1.0 < eval_ppl[6] < 69.0
    assert set(tensorboard_scalars(model_dir / "eval", "accuracy")) == {6}

    # the same command with a later max_steps resumes at step 6, not from scratch
    assert main(["CPU", "--params", str(params), "--max_steps", "8", "--mode", "train"]) == 0
    log = (model_dir / "run.log").read_text()
    assert re.search(r"loaded .*checkpoint_6.mdl .* at step 6", log)
    assert (model_dir / "checkpoint_8.mdl").is_file()
    state = torch.load(model_dir / "checkpoint_8.mdl", weights_only=False)
    assert state["step"] == 8 and state["dataloader"]["batches_done"] + state["dataloader"]["epoch"] > 0

    # evaluate a chosen checkpoint
    assert main(["CPU", "--params", str(params), "--mode", "eval",
                 "--checkpoint_path", str(model_dir / "checkpoint_3.mdl")]) == 0
    assert "eval at step 3" in (model_dir / "run.log").read_text()


def test_training_lowers_the_loss(shards_msl64, tmp_path):
    model_dir = tmp_path / "md"
    raw = tiny_params(shards_msl64, model_dir)
    raw["model"]["dropout_rate"] = 0.0
    raw["runconfig"].update(max_steps=30, checkpoint_steps=0)
    assert main(["CPU", "--params", str(write_params(tmp_path / "p.yaml", raw))]) == 0
    loss = tensorboard_scalars(model_dir / "train", "loss")
    assert sum(loss[s] for s in range(26, 31)) < sum(loss[s] for s in range(1, 6)) - 0.5


def test_max_checkpoints_keeps_the_newest(shards_msl64, tmp_path):
    model_dir = tmp_path / "md"
    raw = tiny_params(shards_msl64, model_dir, checkpoint_steps=1, max_checkpoints=2)
    assert main(["CPU", "--params", str(write_params(tmp_path / "p.yaml", raw))]) == 0
    assert sorted(p.name for p in model_dir.glob("checkpoint_*.mdl")) == ["checkpoint_5.mdl", "checkpoint_6.mdl"]


def test_validate_only_writes_nothing(shards_msl64, tmp_path, capsys):
    model_dir = tmp_path / "md"
    params = write_params(tmp_path / "p.yaml", tiny_params(shards_msl64, model_dir))
    assert main(["CPU", "--params", str(params), "--validate_only"]) == 0
    assert "params OK: gpt2" in capsys.readouterr().out
    assert not model_dir.exists()


@pytest.mark.parametrize("device", ["GPU"])
def test_unavailable_device_is_one_line_exit_2(shards_msl64, tmp_path, capsys, device):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    params = write_params(tmp_path / "p.yaml", tiny_params(shards_msl64, tmp_path / "md"))
    assert main([device, "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "md").exists()


def test_config_error_exits_2_before_writing(shards_msl64, tmp_path, capsys):
    raw = tiny_params(shards_msl64, tmp_path / "md")
    raw["model"]["num_layers"] = 2
    assert main(["CPU", "--params", str(write_params(tmp_path / "p.yaml", raw))]) == 2
    assert "model.num_layers: unknown key; did you mean 'num_hidden_layers'?" in capsys.readouterr().err
    assert not (tmp_path / "md").exists()


def test_prepare_on_first_use(tmp_path):
    from tests.helpers import GENOMES
    raw = tiny_params(tmp_path / "shards", tmp_path / "md", max_steps=2)
    for section in ("train_input", "eval_input"):
        raw[section]["prepare"] = {"input": [str(GENOMES)], "split": [0.67, 0.33, 0.0]}
    params = write_params(tmp_path / "p.yaml", raw)
    assert main(["CPU", "--params", str(params)]) == 0
    assert (tmp_path / "shards" / "train" / "manifest.json").is_file()
    assert (tmp_path / "md" / "checkpoint_2.mdl").is_file()


def test_eval_without_eval_steps_scores_the_whole_eval_set(shards_msl64, tmp_path):
    """Unset eval_steps means every eval window, the last partial batch included (batch 5 does not
    divide the windows), with the loss over exactly the labelled targets."""
    from modelzoo.backends.resident import cpu_backend
    from modelzoo.config import validate_params
    from modelzoo.data.datasets import CausalLMDataset
    from modelzoo.data.shards import ShardSet
    from modelzoo.models import build_model
    from modelzoo.trainer import Trainer

    raw = tiny_params(shards_msl64, tmp_path / "md", eval_steps=None)
    raw["eval_input"]["batch_size"] = 5
    raw["model"]["dropout_rate"] = 0.0
    params = validate_params(raw)
    windows = CausalLMDataset(ShardSet(params.eval_input.data_dir))
    assert len(windows) % 5
    torch.manual_seed(0)
    model, backend = build_model(params.model), cpu_backend()
    trainer = Trainer(params, backend, tmp_path / "md")
    trainer.open_datasets("eval")
    backend.setup(model, None, None)
    got = trainer.evaluate()["loss"]
    everything = {k: torch.stack([windows[i][k] for i in range(len(windows))]) for k in ("input_ids", "labels",
                                                                                      "attention_mask")}
    with torch.no_grad():
        expected = float(model.eval()(everything)["loss"])
    assert got == pytest.approx(expected, rel=1e-5)
