"""Every yaml in configs/ validates, builds (on the meta device: no memory), and has the
parameter count its file name claims (within 3%)."""

import re
from pathlib import Path

import pytest
import torch

from modelzoo.config import load_params
from modelzoo.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
SIZE = re.compile(r"_(\d+(?:\.\d+)?)([MB])(?=_|\.yaml$)")


def claimed_size(path: Path) -> float | None:
    m = SIZE.search(path.name)
    return float(m.group(1)) * {"M": 1e6, "B": 1e9}[m.group(2)] if m else None


def test_presets_exist_for_every_genslm_size():
    names = {p.name for p in CONFIGS}
    for size in ("25M", "250M", "2.5B", "25B"):
        for msl in (2048, 10240):
            assert f"gptj_{size}_msl{msl}.yaml" in names
    assert {"gpt2_25.8M_msl1024.yaml", "gpt2_256M_msl1024.yaml", "bert_25.8M_msl512.yaml",
            "bert_86M_msl512.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_validates_builds_and_matches_its_size(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # data paths in the presets are relative to the repository
    params = load_params(path)
    with torch.device("meta"):
        model = build_model(params.model)
    assert len(model.stages()) == params.model.num_hidden_layers + 2
    count = sum(p.numel() for p in model.parameters())
    size = claimed_size(path)
    if size is not None:
        assert abs(count - size) / size <= 0.03, f"{path.name}: {count:,} parameters"
    for section in (params.train_input, params.eval_input):
        if section is not None and section.labels_file is not None:
            assert Path(section.labels_file).is_file(), section.labels_file
    if params.model.name == "gptj" and "genslm" in path.parts:
        assert params.model.rotary_dim == params.model.head_dim // 4 // 2 * 2  # GenSLM: a quarter of each head


def test_size_pattern():
    assert claimed_size(Path("gptj_2.5B_msl10240.yaml")) == 2.5e9
    assert claimed_size(Path("bert_25.8M_clade_classifier_msl512.yaml")) == 25.8e6
    assert claimed_size(Path("quickstart.yaml")) is None
