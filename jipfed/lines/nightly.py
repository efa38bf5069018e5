"""Running a line: census → training from the released model → federated evaluation → release rule.

:func:`advance` moves one scheduled run of a line (its *slot*) as far as it can without waiting and
returns the run record (``lines/<line>/runs/<slot>.json``); call it again until ``status`` is no
longer ``running``. Every stage keeps its state in the store, so a crashed or cleared run resumes
where it stopped and a release is written once. Training is the round protocol's own core
(``start_experiment``, ``dispatch_step``, ``site_status``, ``aggregate``, ``finalize``: what the
central DAG's operators call) on a short experiment ``<line>-<slot>``.

:func:`due_runs` says which slots are due: per line the latest scheduled time at or before now
(missed nights collapse into one run) unless it already ran, and any unfinished earlier run first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from jipfed.federation import evaluation
from jipfed.federation.site_requests import load_request
from jipfed.lines.cards import model_card
from jipfed.lines.census import census_result, request_census
from jipfed.lines.definition import LineConfig
from jipfed.lines.store import LineStore, list_lines, slot_id
from jipfed.storage.base import ModelStore
from jipfed.storage.state import ExperimentStore, Status

logger = logging.getLogger(__name__)

RUNNING, SKIPPED, RELEASED, REJECTED, FAILED = "running", "skipped", "released", "rejected", "failed"
TERMINAL = (SKIPPED, RELEASED, REJECTED, FAILED)
EVALUATION_NAME = "release-check"


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def due_runs(store: ModelStore, now: datetime) -> list[dict[str, str]]:
    """``[{"line", "slot"}]``: unfinished runs to resume, then each unpaused line's due slot."""
    due = []
    for name in list_lines(store):
        lines = LineStore(store, name)
        try:
            line = lines.load()
        except ValueError as exc:  # one bad definition never stops the other lines
            logger.error("line %s: %s", name, exc)
            continue
        unfinished = [r for r in lines.runs() if r.get("status") == RUNNING]
        if unfinished:
            due.append({"line": name, "slot": unfinished[0]["slot"]})
            continue
        if line.paused:
            continue
        slot = line.due_slot(now)
        if lines.load_run(slot_id(slot)) is None:
            due.append({"line": name, "slot": _iso(slot)})
    return due


def experiment_name(line: str, slot: str) -> str:
    return f"{line}-{slot.lower()}"


def advance(store: ModelStore, line_name: str, slot: str, now: datetime | None = None) -> dict[str, Any]:
    """Move the run of ``line_name`` at ``slot`` (ISO time) on; returns its record."""
    now = now or datetime.now(timezone.utc)
    lines = LineStore(store, line_name)
    line = lines.load()
    sid = slot_id(datetime.fromisoformat(slot))
    run = lines.load_run(sid) or {
        "line": line_name,
        "slot": slot,
        "slot_id": sid,
        "started_at": _iso(now),
        "stage": "census",
        "status": RUNNING,
        "parent": (lines.released() or {}).get("version"),
    }
    if run["status"] in TERMINAL:
        return run
    stages = {"census": _census, "training": _training, "evaluation": _evaluation, "decision": _decision}
    while run["status"] == RUNNING:
        before = run["stage"]
        run = stages[before](lines, line, run, now)
        lines.save_run(sid, run)
        if run["stage"] == before and run["status"] == RUNNING:
            break  # waiting for the sites
    return run


def _census(lines: LineStore, line: LineConfig, run: dict[str, Any], now: datetime) -> dict[str, Any]:
    train = line.experiment_config(experiment_name(line.name, run["slot_id"])).train
    request = request_census(
        lines.store,
        line=line.name,
        slot=run["slot_id"],
        sites=line.sites,
        since=lines.watermarks(),
        as_of=run["slot"],
        replay=line.replay,
        seed=train.seed,
        val_fraction=train.val_fraction,
        timeout_s=line.census_timeout_s,
        now=now,
    )
    result = census_result(lines.store, request, now)
    if result is None:
        return run
    run = {**run, "census": result}
    new = {site: int(c["new_cases"]) for site, c in result["sites"].items()}
    if not any(new.values()):
        failed = f"; no answer from {sorted(result['failed'])}" if result["failed"] else ""
        reason = f"no new cases at any site since the line's watermarks (new cases: {new}){failed}"
        logger.info("line %s, slot %s: skipped: %s", line.name, run["slot"], reason)
        return {**run, "status": SKIPPED, "reason": reason, "finished_at": _iso(now)}
    trainable = [s for s, c in result["sites"].items() if int(c["train_new"]) + int(c["train_replay"]) > 0]
    if not trainable:
        reason = f"new cases {new} are all in the sites' held-out splits and there is no replay sample: nothing to train on"
        return {**run, "status": SKIPPED, "reason": reason, "finished_at": _iso(now)}
    return {**run, "stage": "training", "version": lines.next_version()}


def _training(lines: LineStore, line: LineConfig, run: dict[str, Any], now: datetime) -> dict[str, Any]:
    from jipfed.federation.rounds import finalize

    name = experiment_name(line.name, run["slot_id"])
    exp_store = ExperimentStore(lines.store, name)
    if not lines.store.exists(exp_store.layout.config()):
        start_candidate(lines, line, run, exp_store)
    state = exp_store.load_state()
    if state.status is Status.FAILED:
        return _failed(run, f"training experiment {name} failed: {state.error}", now)
    if state.status is Status.RUNNING:
        waiting = drive_steps(exp_store, now)
        if waiting:
            return {**run, "experiment": name, "waiting": waiting}
        if waiting == []:
            return _failed(run, f"training experiment {name} failed: {exp_store.load_state().error}", now)
        finalize(exp_store)
    trained = _trained_counts(exp_store)
    return {**run, "experiment": name, "stage": "evaluation", "trained": trained, "waiting": []}


def start_candidate(
    lines: LineStore, line: LineConfig, run: dict[str, Any], exp_store: ExperimentStore
) -> None:
    """Create the run's experiment: the sites with cases to train on, warm-started from the released model."""
    from safetensors.torch import load as load_tensors

    from jipfed.federation.round_start import save_initial_global
    from jipfed.federation.rounds import start_experiment

    counts = run["census"]["sites"]
    sites = [s for s in line.sites if s in counts and counts[s]["train_new"] + counts[s]["train_replay"] > 0]
    train = line.experiment_config(exp_store.experiment).train
    marks = lines.watermarks()
    selection = {
        site: {
            "line": line.name,
            "since": marks.get(site),
            "until": run["slot"],
            "replay": line.replay,
            "seed": train.seed,
        }
        for site in sites
    }
    config = line.experiment_config(exp_store.experiment, selection, sites=sites)
    config_hash = exp_store.save_config(config.to_dict())
    if run.get("parent") and not exp_store.has_global(0):
        _, payload, _ = lines.released_model()
        save_initial_global(exp_store, config, config_hash, load_tensors(payload))
    start_experiment(exp_store, config)
    logger.info(
        "line %s: candidate %s trains at %s (parent %s)", line.name, config.name, sites, run.get("parent")
    )


def drive_steps(exp_store: ExperimentStore, now: datetime) -> list[str] | None:
    """Dispatch and close the experiment's steps as far as the sites allow.

    Returns the sites still awaited ([] when the experiment failed, e.g. its quorum was missed), or
    None when every step is aggregated.
    """
    from jipfed.federation.dispatch import (
        TIMED_OUT,
        WAITING,
        dispatch_step,
        load_dispatch,
        record_timeout,
        site_status,
    )
    from jipfed.federation.rounds import fail_experiment, load_config
    from jipfed.tasks.aggregate import aggregate
    from jipfed.tasks.errors import TaskFailed

    config, _ = load_config(exp_store)
    plan = config.make_plan()
    while (step := exp_store.load_state().next_step) < plan.n_steps:
        ps = plan.step(step)
        dispatch = load_dispatch(exp_store, ps.round, step) or dispatch_step(exp_store, step, now=now)
        statuses = {site: site_status(exp_store, dispatch, site, now)[0] for site in ps.sites}
        waiting = sorted(site for site, status in statuses.items() if status == WAITING)
        if waiting:
            return waiting
        for site, status in statuses.items():
            if status == TIMED_OUT:
                record_timeout(exp_store, dispatch, site)
        try:
            aggregate(exp_store, step, open_next=False)
        except TaskFailed as exc:
            fail_experiment(exp_store, str(exc))
            return []
    return None


def _trained_counts(exp_store: ExperimentStore) -> dict[str, Any]:
    """Per site, the cases its updates claimed in the last round (numbers only), and who was left out."""
    from jipfed.tasks.aggregate import step_record

    state = exp_store.load_state()
    record = step_record(exp_store, state.history[-1].step)
    per_site = {}
    for site in record["included"]:
        _, manifest = exp_store.load_update(record["round"], site)
        per_site[site] = int(manifest["n_samples"])
    return {"n_samples": per_site, "rejected": record["rejected"], "missing": record["missing"]}


def _evaluation(lines: LineStore, line: LineConfig, run: dict[str, Any], now: datetime) -> dict[str, Any]:
    from safetensors.torch import load as load_tensors

    from jipfed.federation.rounds import FINAL_MODEL

    exp_store = ExperimentStore(lines.store, run["experiment"])
    prefix = evaluation.evaluation_prefix(exp_store, EVALUATION_NAME)
    if lines.store.exists(f"{prefix}/request.json"):
        request = load_request(lines.store, prefix)
    else:
        models = {
            "candidate": load_tensors(
                lines.store.get_bytes(exp_store.layout.final(f"{FINAL_MODEL}.safetensors"))
            )
        }
        if run.get("parent"):
            models["released"] = load_tensors(lines.released_model()[1])
        request = evaluation.request_evaluation(
            exp_store, EVALUATION_NAME, models, sites=line.sites, timeout_s=line.evaluation_timeout_s, now=now
        )
    summary = evaluation.summarise(lines.store, request, now)
    if summary is None:
        return run
    return {**run, "stage": "decision", "evaluation": summary}


def _decision(lines: LineStore, line: LineConfig, run: dict[str, Any], now: datetime) -> dict[str, Any]:
    from jipfed.federation.rounds import FINAL_MODEL

    exp_store = ExperimentStore(lines.store, run["experiment"])
    verdict = run.get("verdict") or line.rule.apply(run["evaluation"], has_released=bool(run.get("parent")))
    decided_at = run.get("decided_at") or _iso(now)
    run = {**run, "verdict": verdict, "decided_at": decided_at}
    lines.save_run(run["slot_id"], run)  # a crash from here on repeats the same decision
    status = RELEASED if verdict["release"] else REJECTED
    payload = lines.store.get_bytes(exp_store.layout.final(f"{FINAL_MODEL}.safetensors"))
    manifest = lines.store.get_json(exp_store.layout.final(f"{FINAL_MODEL}.json"))
    record = {
        "line": line.name,
        "version": run["version"],
        "status": status,
        "date": decided_at,
        "slot": run["slot"],
        "parent": run.get("parent"),
        "experiment": run["experiment"],
        "sha256": manifest["sha256"],
        "train": exp_store.load_config()["train"],
        "census": run["census"],
        "trained": run["trained"],
        "evaluation": run["evaluation"],
        "verdict": verdict,
    }
    card = model_card(line, record) if status == RELEASED else None
    lines.save_version(record, payload, manifest, card)
    current = (lines.released() or {}).get("version")
    if status == RELEASED and current in (run.get("parent"), run["version"]):  # never over a newer release
        lines.release(run["version"], manifest["sha256"], decided_at)
    lines.advance_watermarks(sorted(run["trained"]["n_samples"]), run["slot"])
    reason = "; ".join(verdict["reasons"])
    logger.info("line %s: %s %s: %s", line.name, run["version"], status, reason)
    return {**run, "status": status, "reason": reason, "finished_at": _iso(now)}


def _failed(run: dict[str, Any], reason: str, now: datetime) -> dict[str, Any]:
    logger.error("line %s, slot %s: %s", run["line"], run["slot"], reason)
    return {**run, "status": FAILED, "reason": reason, "finished_at": _iso(now)}


def define_line(store: ModelStore, data: Mapping[str, Any] | None) -> str | None:
    """Create or change a line from a definition (a form's JSON); None when ``data`` is empty.

    An existing line is changed key by key (``experiment`` and ``rule`` merged); a new one needs
    at least ``name`` and ``sites``. ValueError names the line and the bad field.
    """
    if not data:
        return None
    name = data.get("name")
    if not isinstance(name, str):
        raise ValueError(f"a line definition needs a 'name', got {dict(data)}")
    lines = LineStore(store, name)
    if lines.exists():
        line = lines.load().updated({k: v for k, v in data.items() if k != "name"})
        lines.save(line, create=False)
    else:
        lines.save(LineConfig.from_dict(data), create=True)
    logger.info("line %s defined: %s", name, lines.load().to_dict())
    return name
