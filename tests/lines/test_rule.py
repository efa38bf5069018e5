"""The release rule on evaluation summaries."""

from __future__ import annotations

from jipfed.lines.rule import ReleaseRule


def summary(scores: dict[str, tuple[float, float]], failed: dict[str, str] | None = None) -> dict:
    return {
        "sites": {
            site: {"n_cases": 2, "metrics": {"candidate": {"dice_mean": c}, "released": {"dice_mean": r}}}
            for site, (c, r) in scores.items()
        },
        "failed": failed or {},
    }


def test_not_worse_is_released() -> None:
    verdict = ReleaseRule().apply(summary({"a": (0.6, 0.5), "b": (0.5, 0.5)}), has_released=True)
    assert verdict["release"] and verdict["checks"]["weighted"] == {"candidate": 0.55, "released": 0.5}


def test_weighted_drop_and_site_drop_are_refused_with_reasons() -> None:
    verdict = ReleaseRule(site_tolerance=0.05).apply(
        summary({"a": (0.8, 0.5), "b": (0.3, 0.5)}), has_released=True
    )
    assert not verdict["release"]
    assert verdict["reasons"] == ["site b: dice_mean drops by 0.2000 (tolerance 0.05)"]
    worse = ReleaseRule().apply(summary({"a": (0.4, 0.5)}), has_released=True)
    assert not worse["release"] and "below the released model's" in worse["reasons"][0]


def test_a_site_that_could_not_evaluate_counts_as_configured() -> None:
    scores = summary({"a": (0.6, 0.5)}, failed={"b": "PACS down"})
    assert not ReleaseRule(missing_site="block").apply(scores, has_released=True)["release"]
    assert ReleaseRule(missing_site="ignore").apply(scores, has_released=True)["release"]


def test_first_version_needs_only_scores() -> None:
    first = {"sites": {"a": {"n_cases": 1, "metrics": {"candidate": {"dice_mean": 0.1}}}}, "failed": {}}
    assert ReleaseRule().apply(first, has_released=False)["reasons"] == ["first version of the line"]
    assert not ReleaseRule(min_sites=2).apply(first, has_released=False)["release"]
