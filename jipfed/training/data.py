"""A site's preprocessed cases: index, deterministic split, torch datasets and loaders.

On disk (one preprocessed cache folder, see docs/architecture.md)::

    <dir>/index.json        [{"case_key": str, "file": "<case_key>.npz", "grade": "HGG"|"LGG"|null}, ...]
    <dir>/<case_key>.npz    image (C, X, Y, Z) float32, label (1, X, Y, Z) uint8 with values 0..3

Labels use BraTS 2023 numbering (1 necrotic core, 2 oedema, 3 enhancing) and become the
overlapping region channels WT = {1, 2, 3}, TC = {1, 3}, ET = {3}. The classification target is
the grade (HGG = 1, LGG = 0, case-insensitive); cases without a grade, or with another value
(logged as a warning), are left out of classification.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

GRADES = {"HGG": 1, "LGG": 0}
REGION_LABELS = ((1, 2, 3), (1, 3), (3,))  # WT, TC, ET
MAX_LABEL = 3


@dataclass(frozen=True)
class CaseRecord:
    """One preprocessed case: pseudonymous key, its .npz file, grade (or None), and its site group."""

    case_key: str
    path: Path
    grade: str | None
    group: str


@dataclass(frozen=True)
class SiteData:
    """The cases a site can train and evaluate on (several sites' for pooled training)."""

    records: tuple[CaseRecord, ...]

    def __post_init__(self) -> None:
        keys = [r.case_key for r in self.records]
        if len(set(keys)) != len(keys):
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"duplicate case_key(s): {dupes}")

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def from_dir(cls, directory: str | Path, *, group: str | None = None) -> SiteData:
        """Read ``<directory>/index.json``; ``group`` (default: the folder path) names the site.

        Files are checked to exist; their contents are read lazily by the datasets.
        """
        root = Path(directory)
        index_path = root / "index.json"
        try:
            entries = json.loads(index_path.read_text())
        except FileNotFoundError:
            raise ValueError(f"no index.json in {root}") from None
        if not isinstance(entries, list):
            raise ValueError(f"{index_path}: expected a JSON list, got {type(entries).__name__}")
        name = str(root) if group is None else group
        records = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not {"case_key", "file"} <= set(entry):
                raise ValueError(
                    f"{index_path}[{i}]: expected an object with case_key and file, got {entry!r}"
                )
            key, file, grade = entry["case_key"], entry["file"], entry.get("grade")
            if not isinstance(key, str) or not key:
                raise ValueError(f"{index_path}[{i}]: case_key must be a non-empty string, got {key!r}")
            rel = Path(file) if isinstance(file, str) else None
            if rel is None or rel.is_absolute() or ".." in rel.parts:
                raise ValueError(
                    f"{index_path}[{i}]: file must be a relative path inside {root}, got {file!r}"
                )
            grade = _normalise_grade(grade, f"{index_path}[{i}]")
            path = root / rel
            if not path.is_file():
                raise ValueError(f"{index_path}[{i}]: missing file {path}")
            records.append(CaseRecord(case_key=key, path=path, grade=grade, group=name))
        return cls(tuple(records))

    def split(self, val_fraction: float, seed: int) -> tuple[list[CaseRecord], list[CaseRecord]]:
        """Deterministic (train, val) split, computed per group and concatenated.

        Within a group, cases are ranked by sha256(f"{seed}:{case_key}") and the first
        round(n * val_fraction) are held out, at least one when val_fraction > 0 and n >= 2, and
        never all. The result depends only on keys, groups and seed (not on index order), and the
        split of pooled data is exactly the union of the sites' own splits.
        """
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        groups: dict[str, list[CaseRecord]] = {}
        for record in self.records:
            groups.setdefault(record.group, []).append(record)
        train: list[CaseRecord] = []
        val: list[CaseRecord] = []
        for members in groups.values():
            ranked = sorted(
                members, key=lambda r: hashlib.sha256(f"{seed}:{r.case_key}".encode()).hexdigest()
            )
            n_val = round(len(ranked) * val_fraction)
            if val_fraction > 0 and len(ranked) >= 2:
                n_val = min(max(n_val, 1), len(ranked) - 1)
            val.extend(ranked[:n_val])
            train.extend(ranked[n_val:])
        train.sort(key=lambda r: (r.group, r.case_key))
        val.sort(key=lambda r: (r.group, r.case_key))
        return train, val


def _normalise_grade(grade: object, where: str) -> str | None:
    """ "HGG" / "LGG" (any case, surrounding blanks ignored) or None; other strings warn and become None."""
    if grade is None:
        return None
    if not isinstance(grade, str):
        raise ValueError(f"{where}: grade must be a string or null, got {grade!r}")
    norm = grade.strip().upper()
    if norm in GRADES:
        return norm
    logger.warning(
        "%s: unknown grade %r treated as missing (expected one of %s)", where, grade, sorted(GRADES)
    )
    return None


def pooled_data(sites: Sequence[SiteData]) -> SiteData:
    """All sites' cases in one :class:`SiteData` (centralised baseline); groups keep per-site splits."""
    return SiteData(tuple(r for site in sites for r in site.records))


def load_case(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one case: image (C, X, Y, Z) float32, label (1, X, Y, Z) uint8 in 0..3."""
    with np.load(path, allow_pickle=False) as npz:
        if "image" not in npz or "label" not in npz:
            raise ValueError(f"{path}: expected arrays 'image' and 'label', got {sorted(npz.files)}")
        image = np.asarray(npz["image"], dtype=np.float32)
        label = np.asarray(npz["label"])
    if image.ndim != 4:
        raise ValueError(f"{path}: image must be (C, X, Y, Z), got shape {image.shape}")
    if label.shape != (1, *image.shape[1:]):
        raise ValueError(f"{path}: label shape {label.shape} does not match image {image.shape}")
    if label.dtype != np.uint8 or (label.size and label.max() > MAX_LABEL):
        raise ValueError(
            f"{path}: label must be uint8 in 0..{MAX_LABEL}, got {label.dtype} max {label.max()}"
        )
    if not np.isfinite(image).all():
        raise ValueError(f"{path}: image contains NaN or inf")
    return image, label


def label_to_regions(label: torch.Tensor) -> torch.Tensor:
    """Label map (1, X, Y, Z) with values 0..3 → float regions (3, X, Y, Z): WT, TC, ET."""
    return torch.cat([torch.isin(label, torch.tensor(vals)) for vals in REGION_LABELS]).to(torch.float32)


def _item_generator(seed: int, epoch: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class CaseDataset(Dataset):
    """Tensors of a list of cases, optionally randomly flipped.

    Items are dicts: ``image`` (C, X, Y, Z) float32 and ``label`` — segmentation: regions
    (3, X, Y, Z) float32; classification: grade as int64 scalar (cases without grade are dropped).
    Flips along each spatial axis with p = 0.5 are drawn from (seed, epoch, case_key), so they
    do not depend on loading order or worker count; call :meth:`set_epoch` before each pass.
    """

    def __init__(
        self, records: Sequence[CaseRecord], task: str, *, augment: bool = False, seed: int = 0
    ) -> None:
        if task not in ("segmentation", "classification"):
            raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")
        if task == "classification":
            dropped = [r.case_key for r in records if r.grade is None]
            if dropped:
                logger.info("classification: %d case(s) without grade left out", len(dropped))
            records = [r for r in records if r.grade is not None]
        self.records = list(records)
        self.task = task
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw for the next pass."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        image_np, label_np = load_case(record.path)
        image = torch.from_numpy(image_np)
        if self.task == "segmentation":
            target = label_to_regions(torch.from_numpy(label_np))
        else:
            target = torch.tensor(GRADES[record.grade], dtype=torch.int64)
        if self.augment:
            gen = _item_generator(self.seed, self.epoch, record.case_key)
            axes = [d + 1 for d in range(3) if torch.rand((), generator=gen).item() < 0.5]
            if axes:
                image = torch.flip(image, axes)
                if self.task == "segmentation":
                    target = torch.flip(target, axes)
        return {"image": image.contiguous(), "label": target.contiguous()}


def make_loader(
    dataset: CaseDataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0
) -> DataLoader:
    """DataLoader over ``dataset``; shuffling uses its own generator seeded by ``seed``.

    Batches are dicts of ``image`` (B, C, X, Y, Z) and ``label`` (B, 3, X, Y, Z) or (B,); all
    cases must share one spatial size (the preprocessing step guarantees it).
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=False,
    )
