"""BERT data: [CLS] ... [SEP] framing without losing codons, 15% / 80-10-10 masking that a resumed
run reproduces, and per-record class labels from a TSV."""

import numpy as np
import pytest
import torch

from modelzoo.data.datasets import (FramedWindows, MaskedLMDataset, SequenceClassificationDataset,
                                    build_dataloader, read_label_table)
from modelzoo.data.sequences import read_records
from modelzoo.data.shards import ShardSet
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import ConfigError, DataError
from tests.helpers import GENOMES

TOK = CodonTokenizer()
SPECIALS = [TOK.cls_id, TOK.sep_id, TOK.pad_id]
NEVER_MASKED = SPECIALS + [TOK.unk_id]  # [UNK] is no codon to predict


@pytest.fixture(scope="module")
def train(shards_msl64):
    return ShardSet(shards_msl64 / "train")


def test_windows_are_framed_and_every_codon_kept_in_order(train):
    windows = FramedWindows(train)
    genomes = {r.id: TOK.encode(r.seq) for r in read_records(GENOMES)}
    bodies = {rid: [] for rid in train.record_ids}
    for i in range(len(windows)):
        row = windows[i]
        assert row.shape == (64,) and row[0] == TOK.cls_id
        sep = int(np.flatnonzero(row == TOK.sep_id)[0])
        assert (row[sep + 1:] == TOK.pad_id).all() and not np.isin(row[1:sep], SPECIALS).any()
        bodies[train.record_ids[windows.record_of(i)]].append(row[1:sep])
    for rid, parts in bodies.items():
        assert all(len(p) == 62 for p in parts[:-1]) and 1 <= len(parts[-1]) <= 62
        assert np.array_equal(np.concatenate(parts), genomes[rid])  # nothing dropped or reordered


def test_masking_rates_and_labels(train):
    data = MaskedLMDataset(train, mlm_probability=0.15, seed=3)
    chosen = masked = swapped = kept = candidates = 0
    for i in range(len(data)):
        item, ids = data[i], torch.from_numpy(data.windows[i])
        selected = item["labels"] != -100
        assert selected.any() == bool((~np.isin(ids.numpy(), NEVER_MASKED)).any())  # one at least, if any codon
        assert not np.isin(ids[selected].numpy(), NEVER_MASKED).any()  # never [CLS], [SEP], [PAD] or [UNK]
        assert torch.equal(item["labels"][selected], ids[selected])
        assert torch.equal(item["input_ids"][~selected], ids[~selected])  # only selected codons change
        assert torch.equal(item["attention_mask"], (ids != TOK.pad_id).long())
        inputs = item["input_ids"][selected]
        masked += int((inputs == TOK.mask_id).sum())
        kept += int((inputs == ids[selected]).sum())
        replaced = (inputs != TOK.mask_id) & (inputs != ids[selected])
        assert np.isin(inputs[replaced].numpy(), TOK.codon_ids).all()  # random codons, never specials
        swapped += int(replaced.sum())
        chosen += int(selected.sum())
        candidates += int((~np.isin(ids.numpy(), NEVER_MASKED)).sum())
    assert 0.13 < chosen / candidates < 0.17, chosen / candidates
    assert 0.76 < masked / chosen < 0.84
    # a random codon equals the original 1/64 of the time, so "kept" is a little above 10%
    assert 0.07 < swapped / chosen < 0.13 and 0.07 < kept / chosen < 0.14


def test_masks_are_a_function_of_seed_epoch_and_index(train):
    a, b = MaskedLMDataset(train, seed=5), MaskedLMDataset(train, seed=5)
    assert torch.equal(a[7]["input_ids"], b[7]["input_ids"])
    b.set_epoch(1)
    assert not torch.equal(a[7]["labels"], b[7]["labels"])
    assert not torch.equal(a[7]["labels"], MaskedLMDataset(train, seed=6)[7]["labels"])


def test_resumed_loader_sees_the_same_masked_batches(shards_msl64):
    def loader():
        return build_dataloader(shards_msl64 / "train", 8, shuffle=True, shuffle_seed=0,
                                dataset_cls=MaskedLMDataset, dataset_kwargs={"seed": 1})

    whole = loader()
    batches = iter(whole)
    expected = [next(batches) for _ in range(len(whole.dataset) // 8 + 3)]  # crosses an epoch
    first = loader()
    batches = iter(first)
    for _ in range(5):
        next(batches)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    batches = iter(resumed)
    for want in expected[5:]:
        got = next(batches)
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])


def write_labels(path, rows, header="strain\tclade"):
    path.write_text("\n".join([header, *("\t".join(r) for r in rows)]) + "\n")
    return path


def test_classification_windows_carry_their_record_class(train, tmp_path):
    labels = write_labels(tmp_path / "labels.tsv", [("Wuhan/Hu-1/2019", "19A"), ("Wuhan/WH01/2019", "19A"),
                                                     ("Australia/VIC05/2020", "19B"), ("other", "20A")])
    data = SequenceClassificationDataset(train, labels, "clade", num_labels=3)
    assert data.label_names == ["19A", "19B", "20A"]
    expected = {"Wuhan/Hu-1/2019": 0, "Wuhan/WH01/2019": 0, "Australia/VIC05/2020": 1}
    for i in range(0, len(data), 17):
        item = data[i]
        assert item["labels"].shape == () and item["input_ids"][0] == TOK.cls_id
        assert int(item["labels"]) == expected[train.record_ids[data.windows.record_of(i)]]


def test_label_errors_name_the_file_and_what_is_wrong(train, tmp_path):
    labels = write_labels(tmp_path / "labels.tsv", [("Wuhan/Hu-1/2019", "19A"), ("Wuhan/WH01/2019", "19B")])
    with pytest.raises(DataError, match=r"labels.tsv: no clade for record 'Australia/VIC05/2020' of .*\(1 records"):
        SequenceClassificationDataset(train, labels, "clade")
    with pytest.raises(ConfigError, match="model.num_labels is 4 but column 'clade' .* has 2 classes"):
        SequenceClassificationDataset(train, labels, "clade", num_labels=4)
    with pytest.raises(DataError, match="no column 'clades' \\(label_column\\); did you mean 'clade'"):
        read_label_table(labels, "clades")
    with pytest.raises(DataError, match="cannot read labels file"):
        read_label_table(tmp_path / "missing.tsv", "clade")
    clash = write_labels(tmp_path / "clash.tsv", [("a", "19A"), ("a", "19B")])
    with pytest.raises(DataError, match="line 3: record 'a' appears twice"):
        read_label_table(clash, "clade")
