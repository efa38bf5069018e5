"""LineConfig: validation with clear errors, JSON round trip, schema agreement, due slots."""

from __future__ import annotations

from datetime import datetime, timezone

import jsonschema
import pytest

from jipfed.lines.definition import LINE_SCHEMA, LineConfig
from tests.lines.conftest import tiny_line


def test_round_trip_and_schema() -> None:
    line = tiny_line()
    data = line.to_dict()
    assert LineConfig.from_dict(data) == line
    jsonschema.validate(data, LINE_SCHEMA)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schedule": "every night"}, "schedule must be a cron expression"),
        ({"replay": -1}, "replay must be an integer >= 0"),
        ({"experiment": {"rounds": 3}}, "experiment keys ['rounds'] are not line settings"),
        ({"experiment": {"strategy": "nope"}}, "strategy 'nope'"),
        ({"experiment": {"transport": "push"}}, "pull transport"),
        ({"rule": {"missing_site": "maybe"}}, "missing_site must be one of"),
        ({"colour": "red"}, "unknown key(s) ['colour']"),
        (
            {"experiment": {"privacy": {"secure_aggregation": True}}},
            "secure aggregation is refused for a line",
        ),
    ],
)
def test_bad_definitions_name_the_line_and_field(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match="line 'glioma'") as info:
        tiny_line().updated(change)
    assert message in str(info.value)


def test_updated_merges_experiment_and_rule() -> None:
    line = tiny_line().updated({"rule": {"site_tolerance": 0.01}, "experiment": {"seed": 7}})
    assert line.rule.site_tolerance == 0.01 and line.rule.metric == "dice_mean"
    assert line.experiment["seed"] == 7 and line.experiment["train"]["size"] == "tiny"


def test_due_slot_is_the_latest_scheduled_time() -> None:
    line = tiny_line(schedule="0 2 * * *")
    at = datetime(2026, 12, 6, 2, 0, tzinfo=timezone.utc)
    assert line.due_slot(at) == at
    assert line.due_slot(datetime(2026, 12, 9, 1, 0, tzinfo=timezone.utc)) == datetime(
        2026, 12, 8, 2, 0, tzinfo=timezone.utc
    )


def test_experiment_config_caps_quorum_at_the_training_sites() -> None:
    line = tiny_line().updated({"experiment": {"min_sites": 2}})
    config = line.experiment_config("glioma-x", sites=["site-a"])
    assert config.sites == ("site-a",) and config.min_sites == 1 and config.rounds == 1
