"""Orchestration overhead per round in a real Airflow with 3 sites (issue 4's goal: <= 5 s).

Runs :class:`jipfed.localfed.LocalFederation` (3 Orthancs, ``airflow standalone``, the plugin
endpoint, hosted site DAGs), warms the sites' data caches with a 1-round experiment, then runs
``--rounds`` rounds for each transport and reads every run's task instances from the REST API:

* round wall time: from the dispatch of round r to the dispatch of round r+1 (the times the
  central stored in the dispatch records; the last round: to the end of its aggregation), so
  everything between two rounds counts: collect, aggregate, report, the next central run;
* slowest site's training time: the longest ``train_local`` task that started in the round;
* overhead = wall - slowest training, split into ``to_train_s`` (the dispatch to the start of the
  slowest site's training: the site noticing the step, its work task, the training task's start)
  and ``after_train_s`` (the end of that training to the next dispatch: upload, collect, close);
* one round's task instances (central and sites) with their start, relative to the round's
  dispatch, and duration, so the time between dispatches can be read task by task.

Usage: ``.venv/bin/python benchmarks/orchestration.py [--rounds 4] [--transports pull push]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from jipfed.localfed import CENTRAL_DAG, LocalFederation

TRAIN_TASK = "train_local"
#: The central task that ends a step (aggregation, next dispatch, trigger of the next run).
CLOSE_TASK = "close_step"
PARAMS = {
    "model_size": "tiny",
    "local_epochs": 1,
    "learning_rate": 0.003,
    "batch_size": 2,
    "round_timeout_s": 900,
}


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def task_instances(fed: LocalFederation, dag_id: str) -> list[dict[str, Any]]:
    """Every task instance of ``dag_id`` (all runs)."""
    runs = fed.client.request("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 1000})["dag_runs"]
    return [ti for run in runs for ti in fed.client.list_task_instances(dag_id, run["dag_run_id"])]


def duration(ti: dict[str, Any]) -> float:
    start, end = _time(ti.get("start_date")), _time(ti.get("end_date"))
    return (end - start).total_seconds() if start and end else 0.0


def last_close_end(fed: LocalFederation, begin: datetime, timeout_s: float = 300.0) -> datetime:
    """When the close task that started after ``begin`` ended (it may still be finalizing: waits)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ends = [
            _time(ti["end_date"])
            for ti in task_instances(fed, CENTRAL_DAG)
            if ti["task_id"] == CLOSE_TASK and ti["start_date"] and _time(ti["start_date"]) > begin
        ]
        if ends and all(ends):
            return max(ends)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {CLOSE_TASK} started after {begin} ended within {timeout_s:.0f} s")
        time.sleep(1.0)


def measure(fed: LocalFederation, experiment: str, transport: str) -> list[dict[str, Any]]:
    """Per round: wall time between consecutive dispatches, slowest training, overhead."""
    exp_store = fed.experiment_store(experiment)
    history = exp_store.load_state().history
    dispatched = [_time(exp_store.load_dispatch(r.round, r.step)["dispatched_at"]) for r in history]
    site_dags = [site.site_dag if transport == "push" else site.pull_dag for site in fed.sites]
    trains = [ti for dag in site_dags for ti in task_instances(fed, dag) if ti["task_id"] == TRAIN_TASK]
    rows = []
    for index, begin in enumerate(dispatched):
        # the last round ends when its close task does (aggregated, final model published)
        end = dispatched[index + 1] if index + 1 < len(dispatched) else last_close_end(fed, begin)
        in_round = [ti for ti in trains if ti["start_date"] and begin <= _time(ti["start_date"]) < end]
        slowest_ti = max(in_round, key=duration, default=None)
        slowest = duration(slowest_ti) if slowest_ti else 0.0
        wall = (end - begin).total_seconds()
        to_train = (_time(slowest_ti["start_date"]) - begin).total_seconds() if slowest_ti else 0.0
        rows.append(
            {
                "round": index,
                "sites_trained": len(in_round),
                "wall_s": wall,
                "slowest_train_s": slowest,
                "overhead_s": wall - slowest,
                "to_train_s": to_train,
                "after_train_s": wall - slowest - to_train,
                "begin": begin,
                "end": end,
            }
        )
    return rows


def print_timeline(fed: LocalFederation, transport: str, row: dict[str, Any]) -> None:
    """Every task instance (central and sites) that started in the round of ``row``, in start order."""
    begin, end = row["begin"], row["end"]
    dags = [CENTRAL_DAG, *(site.site_dag if transport == "push" else site.pull_dag for site in fed.sites)]
    tis = [
        (dag, ti)
        for dag in dags
        for ti in task_instances(fed, dag)
        if ti["start_date"] and begin <= _time(ti["start_date"]) < end
    ]
    print(f"round {row['round']}: task instances that started between its dispatch and the next one")
    print(f"{'dag':<28} {'task':<20} {'map':>4} {'start_s':>8} {'dur_s':>7}  state")
    for dag, ti in sorted(tis, key=lambda pair: _time(pair[1]["start_date"])):
        offset = (_time(ti["start_date"]) - begin).total_seconds()
        print(
            f"{dag:<28} {ti['task_id']:<20} {ti['map_index']:>4} {offset:>8.2f} {duration(ti):>7.2f}  {ti['state']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--transports", nargs="+", default=["pull", "push"], choices=["pull", "push"])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="jipfed-orch-"))
    with LocalFederation(workdir, n_sites=3, cases_per_site=4, shape=(48, 48, 32), progress=False) as fed:
        for transport in args.transports:
            fed.enable_sites(transport)
            warm = f"warm-{transport}"
            fed.trigger({**PARAMS, "experiment": warm, "rounds": 1, "transport": transport})
            fed.wait(warm, 900)
            name = f"bench-{transport}"
            fed.trigger({**PARAMS, "experiment": name, "rounds": args.rounds, "transport": transport})
            fed.wait(name, 900 * args.rounds)
            rows = measure(fed, name, transport)
            print(f"\n== {transport}: {args.rounds} rounds, 3 sites ==")
            keys = [k for k in rows[0] if k not in ("begin", "end")]
            print("  ".join(f"{k:>18}" for k in keys))
            for row in rows:
                print(
                    "  ".join(
                        f"{row[k]:>18.2f}" if isinstance(row[k], float) else f"{row[k]:>18}" for k in keys
                    )
                )
            overheads = [r["overhead_s"] for r in rows]
            print(
                f"overhead per round: median {statistics.median(overheads):.2f} s, mean {statistics.mean(overheads):.2f} s, "
                f"max {max(overheads):.2f} s (goal <= 5 s: {'PASS' if statistics.median(overheads) <= 5 else 'MISS'})"
            )
            # the machine's load changes every figure above: say what it was
            print(
                "load average (1, 5, 15 min) after the rounds: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
            )
            print_timeline(fed, transport, rows[min(1, len(rows) - 1)])
            for site in fed.sites:
                fed.client.set_paused(site.site_dag if transport == "push" else site.pull_dag, True)


if __name__ == "__main__":
    main()
