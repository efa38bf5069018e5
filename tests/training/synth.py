"""Tiny synthetic BraTS-like cases for the training tests (learnable, region-coded intensities)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIZE = 16


def make_case(rng: np.random.Generator, size: int, grade: str) -> tuple[np.ndarray, np.ndarray]:
    """A nested blob (oedema ⊃ core ⊃ enhancing rim for HGG) with region-coded channel intensities.

    Returns image (4, S, S, S) float32 and label (1, S, S, S) uint8 in 0..3. Channel 0 is bright on
    WT, 1 on TC, 2 on ET, 3 carries a global grade offset; all with Gaussian noise (sd 0.3).
    """
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    center = rng.uniform(size * 0.35, size * 0.65, size=3)
    radius = rng.uniform(size * 0.2, size * 0.3)
    dist = np.sqrt(((grid - center[:, None, None, None]) ** 2).sum(0))
    label = np.zeros((size,) * 3, np.uint8)
    label[dist < radius] = 2
    label[dist < 0.6 * radius] = 1
    if grade == "HGG":
        label[(dist < 0.6 * radius) & (dist >= 0.35 * radius)] = 3
    wt, tc, et = label > 0, np.isin(label, (1, 3)), label == 3
    image = rng.normal(0.0, 0.3, size=(4, size, size, size)).astype(np.float32)
    image[0] += wt
    image[1] += tc
    image[2] += et
    image[3] += 1.0 if grade == "HGG" else -1.0
    return image, label[None]


def write_site(
    root: Path, n_cases: int, *, seed: int = 0, size: int = SIZE, prefix: str = "", grades: list | None = None
) -> Path:
    """Write ``n_cases`` .npz cases and index.json under ``root``; grades alternate HGG / LGG."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    index = []
    for i in range(n_cases):
        grade = grades[i] if grades is not None else ("HGG" if i % 2 == 0 else "LGG")
        image, label = make_case(rng, size, grade or "LGG")
        key = f"{prefix}{i:04d}{seed:02d}abcdef01"[:16]
        np.savez(root / f"{key}.npz", image=image, label=label)
        index.append({"case_key": key, "file": f"{key}.npz", "grade": grade})
    (root / "index.json").write_text(json.dumps(index))
    return root


def site_trainers(root: Path, sites: tuple[str, ...], train: object) -> dict[str, object]:
    """One CPU ``LocalTrainer`` per site over 4 small synthetic cases each (seeded by the site's index)."""
    import torch

    from jipfed.training.data import SiteData
    from jipfed.training.local import LocalTrainer

    torch.set_num_threads(1)
    return {
        site: LocalTrainer(
            train,  # type: ignore[arg-type]
            SiteData.from_dir(write_site(root / site, 4, seed=i, size=16, prefix=str(i)), group=site),
            device="cpu",
        )
        for i, site in enumerate(sites)
    }
