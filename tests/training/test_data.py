from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jipfed.training.data import CaseDataset, SiteData, label_to_regions, load_case, make_loader, pooled_data


def test_label_to_regions_follows_brats_nesting() -> None:
    label = torch.tensor([0, 1, 2, 3], dtype=torch.uint8).reshape(1, 4, 1, 1)
    regions = label_to_regions(label)
    assert regions.dtype == torch.float32 and regions.shape == (3, 4, 1, 1)
    assert regions[:, :, 0, 0].tolist() == [
        [0, 1, 1, 1],  # WT = {1, 2, 3}
        [0, 1, 0, 1],  # TC = {1, 3}
        [0, 0, 0, 1],  # ET = {3}
    ]


def test_from_dir_reads_index(site_factory) -> None:
    root = site_factory("a", 3, grades=["HGG", None, "LGG"])
    data = SiteData.from_dir(root)
    assert len(data) == 3
    assert [r.grade for r in data.records] == ["HGG", None, "LGG"]
    assert {r.group for r in data.records} == {str(root)}
    image, label = load_case(data.records[0].path)
    assert image.shape == (4, 16, 16, 16) and image.dtype == np.float32
    assert label.shape == (1, 16, 16, 16) and label.max() <= 3


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"case_key": "k", "file": "../x.npz", "grade": None}, "relative path"),
        ({"case_key": "k", "file": "missing.npz", "grade": None}, "missing file"),
        ({"case_key": "", "file": "x.npz", "grade": None}, "case_key"),
        ({"case_key": "k", "file": "x.npz", "grade": 1}, "grade"),
        ({"file": "x.npz"}, "case_key and file"),
    ],
)
def test_from_dir_rejects_bad_index(tmp_path: Path, entry: dict, match: str) -> None:
    (tmp_path / "x.npz").write_bytes(b"")
    (tmp_path / "index.json").write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=match):
        SiteData.from_dir(tmp_path)


def test_grades_are_normalised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = [
        {"case_key": f"k{i}", "file": "x.npz", "grade": g} for i, g in enumerate([" hgg", "LGG", "GBM", None])
    ]
    (tmp_path / "x.npz").write_bytes(b"")
    (tmp_path / "index.json").write_text(json.dumps(index))
    data = SiteData.from_dir(tmp_path)
    assert [r.grade for r in data.records] == ["HGG", "LGG", None, None]
    assert "unknown grade 'GBM'" in caplog.text


def test_load_case_rejects_out_of_range_labels(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, image=np.zeros((4, 2, 2, 2), np.float32), label=np.full((1, 2, 2, 2), 4, np.uint8))
    with pytest.raises(ValueError, match="0..3"):
        load_case(path)
    np.savez(path, image=np.zeros((4, 2, 2, 2), np.float32), label=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="does not match"):
        load_case(path)


def test_split_is_deterministic_disjoint_and_order_independent(site_factory) -> None:
    root = site_factory("a", 10)
    data = SiteData.from_dir(root)
    train, val = data.split(0.3, seed=1)
    keys = {r.case_key for r in data.records}
    assert len(val) == 3 and len(train) == 7
    assert {r.case_key for r in train} | {r.case_key for r in val} == keys
    assert not {r.case_key for r in train} & {r.case_key for r in val}
    reversed_data = SiteData(tuple(reversed(data.records)))
    assert reversed_data.split(0.3, seed=1) == (train, val)
    other_seeds = [{r.case_key for r in data.split(0.3, seed=s)[1]} for s in range(2, 6)]
    assert any(v != {r.case_key for r in val} for v in other_seeds)
    assert data.split(0.0, seed=1) == (sorted(train + val, key=lambda r: r.case_key), [])
    assert len(SiteData.from_dir(site_factory("b", 2)).split(0.01, seed=0)[1]) == 1


def test_pooled_split_is_union_of_site_splits(site_factory) -> None:
    a = SiteData.from_dir(site_factory("a", 5, prefix="a"))
    b = SiteData.from_dir(site_factory("b", 7, seed=3, prefix="b"))
    pooled = pooled_data([a, b])
    assert len(pooled) == 12
    p_train, p_val = pooled.split(0.2, seed=4)
    a_train, a_val = a.split(0.2, seed=4)
    b_train, b_val = b.split(0.2, seed=4)
    assert set(p_val) == set(a_val) | set(b_val)
    assert set(p_train) == set(a_train) | set(b_train)
    with pytest.raises(ValueError, match="duplicate"):
        pooled_data([a, a])


def test_dataset_segmentation_items_and_seeded_flips(site_factory) -> None:
    records = SiteData.from_dir(site_factory("a", 4)).records
    item = CaseDataset(records, "segmentation")[0]
    assert item["image"].shape == (4, 16, 16, 16) and item["label"].shape == (3, 16, 16, 16)
    subsets = [[], [1], [2], [3], [1, 2], [1, 3], [2, 3], [1, 2, 3]]
    aug = CaseDataset(records, "segmentation", augment=True, seed=3)
    seen = []
    for epoch in range(8):
        aug.set_epoch(epoch)
        out = aug[0]
        assert torch.equal(out["image"], aug[0]["image"]), "same (seed, epoch) must give the same flips"
        # image and regions are flipped along the same axes
        matches = [a for a in subsets if torch.equal(out["image"], torch.flip(item["image"], a))]
        assert len(matches) == 1
        assert torch.equal(out["label"], torch.flip(item["label"], matches[0]))
        seen.append(tuple(matches[0]))
    assert len(set(seen)) > 2, f"flips hardly vary across epochs: {seen}"


def test_dataset_classification_drops_missing_grade(site_factory) -> None:
    records = SiteData.from_dir(site_factory("a", 3, grades=["HGG", None, "LGG"])).records
    ds = CaseDataset(records, "classification")
    assert len(ds) == 2
    assert [ds[i]["label"].item() for i in range(2)] == [1, 0]
    batch = next(iter(make_loader(ds, 2, shuffle=False)))
    assert batch["image"].shape == (2, 4, 16, 16, 16) and batch["label"].tolist() == [1, 0]
