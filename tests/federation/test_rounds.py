"""The round protocol: start / open / accept / aggregate / finalize, and the site side of a step."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from training.synth import write_site

from jipfed.federation.arrival import arrival_key
from jipfed.federation.codec import EncodedUpdate, decode_update
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import (
    ProtocolError,
    QuorumNotMet,
    StepTicket,
    UpdateRefused,
    accept_update,
    aggregate_step,
    fail_experiment,
    finalize,
    open_step,
    start_experiment,
)
from jipfed.federation.site_round import SiteStepError, run_site_step
from jipfed.federation.update import ModelUpdate, UpdateManifest, spec_of
from jipfed.federation.validation import ExpectedUpdate
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ConfigConflictError, ExperimentStore, IntegrityError, Status, sha256_hex
from jipfed.testing.s3 import S3TestServer
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData
from jipfed.training.local import LocalTrainer

SITES = ("site-a", "site-b", "site-c")
TRAIN = TrainConfig(size="tiny", steps=1, batch_size=2, lr=0.01, amp=False, augment=False)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SiteData]:
    root = tmp_path_factory.mktemp("sites")
    return {
        site: SiteData.from_dir(write_site(root / site, 4, seed=i, size=16, prefix=str(i)), group=site)
        for i, site in enumerate(SITES)
    }


@pytest.fixture
def trainers(site_data: dict[str, SiteData]) -> dict[str, LocalTrainer]:
    return {site: LocalTrainer(TRAIN, data, device="cpu") for site, data in site_data.items()}


def config(**overrides: Any) -> ExperimentConfig:
    values: dict[str, Any] = {"name": "exp1", "sites": SITES, "rounds": 2, "train": TRAIN}
    values.update(overrides)
    return ExperimentConfig(**values)


def new_store(path: Path, store_cls: type[LocalFolderStore] = LocalFolderStore) -> ExperimentStore:
    return ExperimentStore(store_cls(path), "exp1")


def train_site(
    exp_store: ExperimentStore, ticket: StepTicket, site: str, trainer: LocalTrainer
) -> EncodedUpdate:
    payload = exp_store.store.get_bytes(ticket.model_key)
    manifest = exp_store.store.get_bytes(ticket.manifest_key)
    return run_site_step(
        ticket,
        payload,
        manifest,
        trainer,
        site,
        exp_store.experiment,
        exp_store.config_hash(),
        evaluate=False,
    )


def upload(exp_store: ExperimentStore, ticket: StepTicket, site: str, trainer: LocalTrainer) -> EncodedUpdate:
    encoded = train_site(exp_store, ticket, site, trainer)
    accept_update(exp_store, site, ticket.round, encoded.payload, encoded.manifest.to_json())
    return encoded


def run_step(
    exp_store: ExperimentStore, step: int, trainers: dict[str, LocalTrainer], sites: Any = None
) -> Any:
    ticket = open_step(exp_store, step)
    for site in ticket.sites if sites is None else sites:
        upload(exp_store, ticket, site, trainers[site])
    return aggregate_step(exp_store, step)


def listing(exp_store: ExperimentStore) -> dict[str, bytes]:
    return {key: exp_store.store.get_bytes(key) for key in exp_store.store.list("")}


# -- start / open ----------------------------------------------------------------------------------


def test_start_is_idempotent_and_the_config_immutable(tmp_path: Path) -> None:
    exp_store = new_store(tmp_path)
    state = start_experiment(exp_store, config())
    assert state.status is Status.RUNNING and state.next_step == 0
    payload, manifest = exp_store.load_global(0)
    assert (
        manifest["sha256"] == sha256_hex(payload) and manifest["round"] == 0 and manifest["site"] == "global"
    )
    assert manifest["config_hash"] == exp_store.config_hash()
    before = listing(exp_store)
    assert start_experiment(new_store(tmp_path), config()) == state
    assert listing(exp_store) == before
    with pytest.raises(ConfigConflictError, match="immutable"):
        start_experiment(exp_store, config(rounds=5))
    with pytest.raises(ValueError, match="experiment 'other'"):
        start_experiment(exp_store, config(name="other"))


def test_initial_model_is_seeded(tmp_path: Path) -> None:
    a, b, c = new_store(tmp_path / "a"), new_store(tmp_path / "b"), new_store(tmp_path / "c")
    start_experiment(a, config(seed=1))
    start_experiment(b, config(seed=1))
    start_experiment(c, config(seed=2))
    assert a.load_global(0)[0] == b.load_global(0)[0]
    assert a.load_global(0)[0] != c.load_global(0)[0]


def test_ticket_names_the_start_model_and_the_fit_settings(tmp_path: Path) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config(strategy="fedprox", strategy_kwargs={"mu": 0.1}, min_sites=2))
    ticket = open_step(exp_store, 0)
    assert ticket.sites == SITES and ticket.round == 0 and ticket.hop is None and ticket.kind == "delta"
    assert ticket.model_sha256 == sha256_hex(exp_store.store.get_bytes(ticket.model_key))
    assert dict(ticket.fit_config) == {"mu": 0.1}
    assert {site: dict(w) for site, w in ticket.local_work.items()} == {s: {"steps": 1} for s in SITES}
    assert StepTicket.from_json(ticket.to_json()) == ticket
    with pytest.raises(ProtocolError, match="step 1 cannot open before step 0"):
        open_step(exp_store, 1)
    with pytest.raises(ProtocolError, match=r"step must be in \[0, 2\)"):
        open_step(exp_store, 2)


# -- accept ----------------------------------------------------------------------------------------


def test_wrong_round_unselected_duplicate_and_forged_updates_are_refused(
    tmp_path: Path, trainers: dict[str, LocalTrainer]
) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config(sites=SITES[:2], min_sites=1))
    ticket = open_step(exp_store, 0)
    encoded = train_site(exp_store, ticket, "site-a", trainers["site-a"])
    body = (encoded.payload, encoded.manifest.to_json())

    with pytest.raises(UpdateRefused, match="belongs to round 0, not round 1") as info:
        accept_update(exp_store, "site-a", 1, *body)
    assert info.value.code == "wrong_round"
    with pytest.raises(UpdateRefused, match="not selected") as info:
        accept_update(exp_store, "site-c", 0, *body)
    assert info.value.code == "not_selected"
    with pytest.raises(UpdateRefused, match="manifest site is 'site-a', expected 'site-b'") as info:
        accept_update(exp_store, "site-b", 0, *body)  # site-a's update sent as site-b's
    assert info.value.code == "rejected"
    other = json.loads(body[1])
    other["experiment"] = "exp2"
    with pytest.raises(UpdateRefused, match="manifest experiment is 'exp2'"):
        accept_update(exp_store, "site-a", 0, body[0], json.dumps(other))
    assert exp_store.list_updates(0) == []

    accept_update(exp_store, "site-a", 0, *body)
    stored = exp_store.store.get_bytes(exp_store.layout.update(0, "site-a"))
    again = train_site(exp_store, ticket, "site-a", trainers["site-a"])
    with pytest.raises(UpdateRefused, match="already uploaded") as info:
        accept_update(exp_store, "site-a", 0, again.payload, again.manifest.to_json())
    assert info.value.code == "duplicate"
    assert exp_store.store.get_bytes(exp_store.layout.update(0, "site-a")) == stored


def test_tampered_payload_is_refused_by_the_codec(tmp_path: Path, trainers: dict[str, LocalTrainer]) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config())
    ticket = open_step(exp_store, 0)
    encoded = train_site(exp_store, ticket, "site-a", trainers["site-a"])
    tampered = bytearray(encoded.payload)
    tampered[-1] ^= 0xFF
    with pytest.raises(UpdateRefused, match="sha256") as info:
        accept_update(exp_store, "site-a", 0, bytes(tampered), encoded.manifest.to_json())
    assert info.value.code == "rejected" and info.value.site == "site-a" and info.value.round == 0
    assert exp_store.list_updates(0) == []


def test_late_update_is_refused_after_the_round_closed(
    tmp_path: Path, trainers: dict[str, LocalTrainer]
) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config(min_sites=2))
    ticket = open_step(exp_store, 0)
    late = train_site(exp_store, ticket, "site-c", trainers["site-c"])
    upload(exp_store, ticket, "site-a", trainers["site-a"])
    upload(exp_store, ticket, "site-b", trainers["site-b"])
    record = aggregate_step(exp_store, 0)
    assert record.included == ("site-a", "site-b") and record.metrics["missing"] == ["site-c"]
    assert exp_store.load_aggregate(0)["missing"] == ["site-c"]
    with pytest.raises(UpdateRefused, match="late update refused: round 0 is already closed") as info:
        accept_update(exp_store, "site-c", 0, late.payload, late.manifest.to_json())
    assert info.value.code == "late"
    assert exp_store.list_updates(0) == ["site-a", "site-b"]


def test_a_failed_experiment_refuses_uploads_and_resumes_where_it_stopped(
    tmp_path: Path, trainers: dict[str, LocalTrainer]
) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config())
    ticket = open_step(exp_store, 0)
    encoded = train_site(exp_store, ticket, "site-a", trainers["site-a"])
    state = fail_experiment(exp_store, "round 0: quorum not met after the timeout")
    assert state.status is Status.FAILED
    with pytest.raises(UpdateRefused, match="the experiment is failed") as info:
        accept_update(exp_store, "site-a", 0, encoded.payload, encoded.manifest.to_json())
    assert info.value.code == "not_running"
    with pytest.raises(ProtocolError, match="quorum not met after the timeout"):
        open_step(exp_store, 0)
    assert start_experiment(exp_store, config()).status is Status.RUNNING
    accept_update(exp_store, "site-a", 0, encoded.payload, encoded.manifest.to_json())
    assert exp_store.list_updates(0) == ["site-a"]


# -- aggregate -------------------------------------------------------------------------------------


def test_quorum_not_met_leaves_global_and_state_untouched(
    tmp_path: Path, trainers: dict[str, LocalTrainer]
) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config())  # min_sites = every site
    ticket = open_step(exp_store, 0)
    upload(exp_store, ticket, "site-a", trainers["site-a"])
    upload(exp_store, ticket, "site-b", trainers["site-b"])
    state, before = exp_store.load_state(), listing(exp_store)
    with pytest.raises(QuorumNotMet, match=r"round 0 \(step 0\): quorum not met") as info:
        aggregate_step(exp_store, 0)
    assert info.value.missing == ("site-c",) and info.value.required == 3
    assert "site-c" in str(info.value)
    assert listing(exp_store) == before
    assert exp_store.load_state() == state
    assert not exp_store.has_global(1)

    upload(exp_store, ticket, "site-c", trainers["site-c"])  # the straggler arrives: now it goes through
    assert aggregate_step(exp_store, 0).included == SITES
    assert exp_store.has_global(1)


def test_codec_rejected_update_is_recorded_while_the_others_aggregate(
    tmp_path: Path, trainers: dict[str, LocalTrainer]
) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config(min_sites=1))
    ticket = open_step(exp_store, 0)
    upload(exp_store, ticket, "site-a", trainers["site-a"])
    upload(exp_store, ticket, "site-b", trainers["site-b"])
    # site-c uploads straight to the store (as with a presigned PUT), bypassing accept_update: a
    # well-formed, correctly hashed update holding NaN.
    good = train_site(exp_store, ticket, "site-c", trainers["site-c"])
    expected = ExpectedUpdate.from_weights(
        _weights(exp_store, ticket),
        experiment="exp1",
        round=0,
        site="site-c",
        config_hash=exp_store.config_hash(),
    )
    tensors = dict(decode_update(good.payload, good.manifest, expected).tensors)
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    payload = safetensors.torch.save(tensors)
    manifest = good.manifest.replace(sha256=sha256_hex(payload))
    exp_store.save_update(0, "site-c", payload, manifest.to_dict())

    record = aggregate_step(exp_store, 0)
    assert record.included == ("site-a", "site-b")
    assert "NaN" in record.rejected["site-c"]
    stored = exp_store.load_aggregate(0)
    assert stored["included"] == ["site-a", "site-b"] and "NaN" in stored["rejected"]["site-c"]
    assert set(stored["sites"]) == {"site-a", "site-b"}
    new_global = _weights(exp_store, open_step(exp_store, 1))
    assert all(torch.isfinite(t).all() for t in new_global.values())


def _flip_last_byte(exp_store: ExperimentStore, round_: int, site: str) -> None:
    """Change a stored update after its arrival check, as someone with store access would rewrite it.

    The new bytes are written to a new file that replaces the stored one (as the store, rsync or an
    editor write), so the stored object's identity changes (its inode) though its size does not.
    """
    path = Path(exp_store.store.uri(exp_store.layout.update(round_, site)))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    tmp = path.with_name(f".{path.name}.rewrite")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


REHASHED = "since its arrival check; hashing it again"


@pytest.mark.parametrize("min_sites", [2, 3])
def test_an_update_changed_after_its_arrival_check_is_excluded_while_aggregating(
    tmp_path: Path, trainers: dict[str, LocalTrainer], min_sites: int, caplog: pytest.LogCaptureFixture
) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config(min_sites=min_sites))
    ticket = open_step(exp_store, 0)
    for site in SITES:
        upload(exp_store, ticket, site, trainers[site])
    manifest = exp_store.store.get_json(exp_store.layout.update_manifest(0, "site-b"))
    checked = exp_store.store.get_json(arrival_key(exp_store, 0, "site-b"))
    assert (checked["sha256"], checked["site"]) == (manifest["sha256"], "site-b")  # recorded at arrival
    _flip_last_byte(exp_store, 0, "site-b")
    caplog.set_level(logging.INFO, logger="jipfed.federation.arrival")
    if min_sites == 3:  # without site-b the quorum is missed: nothing is written
        before = listing(exp_store)
        with pytest.raises(QuorumNotMet, match="quorum not met"):
            aggregate_step(exp_store, 0)
        assert listing(exp_store) == before and not exp_store.has_global(1)
        return
    record = aggregate_step(exp_store, 0)
    assert record.included == ("site-a", "site-c")
    assert "changed since" in record.rejected["site-b"]
    stored = exp_store.load_aggregate(0)
    assert stored["included"] == ["site-a", "site-c"] and "changed since" in stored["rejected"]["site-b"]
    assert stored["n_samples"] == sum(stored["sites"][s]["n_samples"] for s in ("site-a", "site-c"))
    assert all(torch.isfinite(t).all() for t in _weights(exp_store, open_step(exp_store, 1)).values())
    # only the rewritten update (new inode) was hashed again; the others by their recorded identity
    rehashed = [m for m in caplog.messages if REHASHED in m]
    assert len(rehashed) == 1 and "site-b: its inode" in rehashed[0]


def test_a_copied_store_aggregates_every_update_after_hashing_it_again(
    tmp_path: Path, trainers: dict[str, LocalTrainer], caplog: pytest.LogCaptureFixture
) -> None:
    """A store restored or moved elsewhere (new inodes, same bytes) loses no update."""
    exp_store = new_store(tmp_path / "store")
    start_experiment(exp_store, config(min_sites=3))
    ticket = open_step(exp_store, 0)
    for site in SITES:
        upload(exp_store, ticket, site, trainers[site])
    shutil.copytree(tmp_path / "store", tmp_path / "copy")
    copied = new_store(tmp_path / "copy")
    caplog.set_level(logging.INFO, logger="jipfed.federation.arrival")
    record = aggregate_step(copied, 0)
    assert record.included == SITES and not record.rejected
    assert sum(REHASHED in m for m in caplog.messages) == len(SITES)


def test_an_s3_object_rewritten_after_its_arrival_check_is_hashed_again_and_excluded(
    tmp_path: Path, trainers: dict[str, LocalTrainer], caplog: pytest.LogCaptureFixture
) -> None:
    """On S3 the identity is size + ETag: the rewritten object is hashed again, the others are not."""
    with S3TestServer() as server:
        exp_store = ExperimentStore(server.make_store(prefix="fed"), "exp1")
        start_experiment(exp_store, config(min_sites=2))
        ticket = open_step(exp_store, 0)
        for site in SITES:
            upload(exp_store, ticket, site, trainers[site])
        key = exp_store.layout.update(0, "site-b")
        data = bytearray(exp_store.store.get_bytes(key))
        data[-1] ^= 0x01
        exp_store.store.put_bytes(key, bytes(data), overwrite=True)
        caplog.set_level(logging.INFO, logger="jipfed.federation.arrival")
        record = aggregate_step(exp_store, 0)
    assert record.included == ("site-a", "site-c") and "changed since" in record.rejected["site-b"]
    rehashed = [m for m in caplog.messages if REHASHED in m]
    assert len(rehashed) == 1 and "site-b: its etag changed" in rehashed[0]


def _weights(exp_store: ExperimentStore, ticket: StepTicket) -> dict[str, torch.Tensor]:
    payload = exp_store.store.get_bytes(ticket.model_key)
    manifest = UpdateManifest.from_json(exp_store.store.get_bytes(ticket.manifest_key))
    expected = ExpectedUpdate.for_global(
        experiment="exp1", round=manifest.round, config_hash=exp_store.config_hash(), tensors=manifest.tensors
    )
    return dict(decode_update(payload, manifest, expected).tensors)


def test_fedavg_of_one_site_reproduces_its_local_training(
    tmp_path: Path, site_data: dict[str, SiteData]
) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config(sites=("site-a",), rounds=1))
    ticket = open_step(exp_store, 0)
    start = _weights(exp_store, ticket)
    upload(exp_store, ticket, "site-a", LocalTrainer(TRAIN, site_data["site-a"], device="cpu"))
    aggregate_step(exp_store, 0)
    local = LocalTrainer(TRAIN, site_data["site-a"], device="cpu").train(start, round=0).weights
    payload, manifest_data = exp_store.load_global(1)
    manifest = UpdateManifest.from_dict(manifest_data)
    expected = ExpectedUpdate.for_global(
        experiment="exp1", round=1, config_hash=exp_store.config_hash(), tensors=manifest.tensors
    )
    new_global = decode_update(payload, manifest, expected).tensors
    assert any(not torch.equal(local[name], start[name]) for name in start)
    for name, tensor in local.items():
        torch.testing.assert_close(new_global[name], tensor, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("strategy", "kwargs"), [("fedavg", {}), ("median", {}), ("trimmed_mean", {"beta": 0.34})]
)
def test_aggregate_step_equals_the_strategy_on_the_decoded_updates(
    tmp_path: Path, trainers: dict[str, LocalTrainer], strategy: str, kwargs: dict[str, Any]
) -> None:
    """The step reads the stored files per tensor (robust reducers: tensor by tensor); same result as in memory."""
    exp_store = new_store(tmp_path)
    cfg = config(rounds=1, strategy=strategy, strategy_kwargs=kwargs)
    start_experiment(exp_store, cfg)
    ticket = open_step(exp_store, 0)
    start = _weights(exp_store, ticket)
    uploaded = [upload(exp_store, ticket, site, trainers[site]) for site in SITES]
    decoded = [
        decode_update(
            u.payload,
            u.manifest,
            ExpectedUpdate.from_weights(
                start, experiment="exp1", round=0, site=u.manifest.site, config_hash=exp_store.config_hash()
            ),
        )
        for u in uploaded
    ]
    in_memory = cfg.make_strategy().aggregate(start, decoded, 0)
    aggregate_step(exp_store, 0)
    payload, manifest = exp_store.load_global(1)
    expected = ExpectedUpdate.for_global(
        experiment="exp1", round=1, config_hash=exp_store.config_hash(), tensors=spec_of(start)
    )
    new_global = decode_update(payload, manifest, expected).tensors
    assert list(new_global) == list(start)  # the model's order, not the files'
    for name, tensor in in_memory.items():
        assert torch.equal(new_global[name], tensor), name
    # written tensor by tensor while aggregating (fedavg) or after (robust reducers): safetensors' bytes
    assert payload == safetensors.torch.save(in_memory)


def test_rerunning_a_completed_step_changes_nothing(
    tmp_path: Path, trainers: dict[str, LocalTrainer]
) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config(rounds=3))
    record = run_step(exp_store, 0, trainers)
    with pytest.raises(ProtocolError, match="step 2 cannot run before step 1"):
        aggregate_step(exp_store, 2)
    before, state = listing(exp_store), exp_store.load_state()
    assert aggregate_step(exp_store, 0) == record
    assert aggregate_step(new_store(tmp_path), 0) == record
    assert listing(exp_store) == before and exp_store.load_state() == state
    assert open_step(exp_store, 0).model_key == exp_store.layout.global_model(0)  # re-opening is harmless


class CrashOnce(LocalFolderStore):
    """A store that fails the next write of a key ending in ``CrashOnce.armed`` (a crash mid-step)."""

    armed: str | None = None

    def _publish(self, key: str, tmp: Path, overwrite: bool) -> None:  # every write (put_stream, pending)
        if CrashOnce.armed is not None and key.endswith(CrashOnce.armed):
            CrashOnce.armed = None
            raise OSError(f"simulated crash before writing {key}")
        super()._publish(key, tmp, overwrite)


@pytest.fixture
def crash_once() -> Iterator[type[CrashOnce]]:
    CrashOnce.armed = None
    yield CrashOnce
    CrashOnce.armed = None


@pytest.mark.parametrize("crash_key", ["rounds/2/global.safetensors", "rounds/1/strategy.json", "state.json"])
def test_resume_after_a_crash_matches_an_uninterrupted_run(
    tmp_path: Path,
    site_data: dict[str, SiteData],
    crash_once: type[CrashOnce],
    crash_key: str,
) -> None:
    cfg = config(rounds=3, strategy="fedadam", strategy_kwargs={"eta": 0.01, "tau": 0.001})

    def fresh_trainers() -> dict[str, LocalTrainer]:
        return {site: LocalTrainer(TRAIN, data, device="cpu") for site, data in site_data.items()}

    straight = new_store(tmp_path / "straight")
    start_experiment(straight, cfg)
    for step in range(3):
        run_step(straight, step, fresh_trainers())

    resumed = new_store(tmp_path / "resumed", crash_once)
    start_experiment(resumed, cfg)
    run_step(resumed, 0, fresh_trainers())
    ticket = open_step(resumed, 1)
    for site in ticket.sites:
        upload(resumed, ticket, site, fresh_trainers()[site])
    crash_once.armed = crash_key
    with pytest.raises(OSError, match="simulated crash"):
        aggregate_step(resumed, 1)
    assert resumed.load_state().next_step == 1
    assert resumed.store.exists(resumed.layout.aggregate(1))  # the decision was written before the crash

    # A new central process: new store object, strategy rebuilt from the store.
    restarted = new_store(tmp_path / "resumed")
    aggregate_step(restarted, 1)
    run_step(restarted, 2, fresh_trainers())
    for round_ in (1, 2, 3):
        assert restarted.load_global(round_)[0] == straight.load_global(round_)[0]
    lay = straight.layout
    for key in (lay.strategy_state(2), lay.strategy_state_manifest(2), lay.aggregate(1)):
        assert restarted.store.get_bytes(key) == straight.store.get_bytes(key)
    assert [r.to_dict() for r in restarted.load_state().history] == [
        r.to_dict() for r in straight.load_state().history
    ]


def test_finalize_publishes_the_model_and_a_card(tmp_path: Path, trainers: dict[str, LocalTrainer]) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config(rounds=1))
    with pytest.raises(ProtocolError, match="1 step\\(s\\) still open"):
        finalize(exp_store)
    run_step(exp_store, 0, trainers)
    card = finalize(exp_store, evaluation={"heldout_dice_mean": 0.5})
    assert card["model"]["sha256"] == sha256_hex(exp_store.load_global(1)[0])
    assert card["evaluation"] == {"heldout_dice_mean": 0.5}
    assert card["participation"]["included_per_step"] == [3]
    final = exp_store.store.get_bytes(exp_store.layout.final("model.safetensors"))
    assert final == exp_store.load_global(1)[0]
    assert exp_store.load_state().status is Status.FINISHED
    assert finalize(exp_store) == card  # idempotent
    with pytest.raises(UpdateRefused, match="late update refused"):
        accept_update(exp_store, "site-a", 0, b"x", "{}")


# -- cyclic ----------------------------------------------------------------------------------------


def test_cyclic_hops_pass_the_model_on(tmp_path: Path, trainers: dict[str, LocalTrainer]) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config(plan="cyclic", rounds=1))
    first = open_step(exp_store, 0)
    assert first.sites == ("site-a",) and first.kind == "weights" and first.hop == 0
    with pytest.raises(UpdateRefused, match="not selected for step 0") as info:
        accept_update(exp_store, "site-b", 0, b"x", "{}")
    assert info.value.code == "not_selected"
    sent = upload(exp_store, first, "site-a", trainers["site-a"])
    aggregate_step(exp_store, 0)
    second = open_step(exp_store, 1)
    assert second.model_key == exp_store.layout.hop_model(0, 0)
    hop_model = exp_store.store.get_bytes(second.model_key)
    assert safetensors.torch.load(hop_model).keys() == safetensors.torch.load(sent.payload).keys()
    with pytest.raises(UpdateRefused, match="already uploaded"):
        accept_update(exp_store, "site-a", 0, sent.payload, sent.manifest.to_json())
    run_step(exp_store, 1, trainers)
    run_step(exp_store, 2, trainers)
    aggregate = exp_store.load_aggregate(0)
    assert aggregate["included"] == ["site-c"] and [h["included"] for h in aggregate["hops"]] == [
        ["site-a"],
        ["site-b"],
    ]
    assert exp_store.has_global(1)


def test_cyclic_hop_without_update_passes_the_model_through_within_quorum(
    tmp_path: Path, trainers: dict[str, LocalTrainer]
) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config(plan="cyclic", rounds=1, min_sites=2))
    run_step(exp_store, 0, trainers)
    record = aggregate_step(exp_store, 1)  # site-b never uploads: one failed hop is allowed
    assert record.included == () and record.metrics["missing"] == ["site-b"]
    assert exp_store.store.get_bytes(exp_store.layout.hop_model(0, 1)) == exp_store.store.get_bytes(
        exp_store.layout.hop_model(0, 0)
    )
    with pytest.raises(QuorumNotMet, match="quorum not met"):
        aggregate_step(exp_store, 2)  # a second failed hop would leave fewer than 2 sites


# -- site side -------------------------------------------------------------------------------------


def test_site_refuses_a_model_that_does_not_match_the_ticket(
    tmp_path: Path, trainers: dict[str, LocalTrainer]
) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config())
    ticket = open_step(exp_store, 0)
    payload = exp_store.store.get_bytes(ticket.model_key)
    manifest = exp_store.store.get_bytes(ticket.manifest_key)
    trainer, cfg_hash = trainers["site-a"], exp_store.config_hash()
    swapped = ModelUpdate.build(
        {k: v + 1 for k, v in safetensors.torch.load(payload).items()},
        experiment="exp1",
        round=0,
        site="global",
        kind="weights",
        n_samples=0,
        config_hash=cfg_hash,
    )
    other = safetensors.torch.save(dict(swapped.tensors))
    with pytest.raises(SiteStepError, match="does not match|refusing to train"):
        run_site_step(ticket, other, manifest, trainer, "site-a", "exp1", cfg_hash)
    with pytest.raises(SiteStepError, match="not selected"):
        run_site_step(ticket, payload, manifest, trainer, "site-x", "exp1", cfg_hash)
    with pytest.raises(SiteStepError, match="joined 'exp2'"):
        run_site_step(ticket, payload, manifest, trainer, "site-a", "exp2", cfg_hash)


def test_site_update_carries_only_aggregate_numbers(
    tmp_path: Path, trainers: dict[str, LocalTrainer]
) -> None:
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config(encoding="fp16"))
    ticket = open_step(exp_store, 0)
    trainer = trainers["site-a"]
    encoded = run_site_step(
        ticket,
        exp_store.store.get_bytes(ticket.model_key),
        exp_store.store.get_bytes(ticket.manifest_key),
        trainer,
        "site-a",
        "exp1",
        exp_store.config_hash(),
    )
    manifest = encoded.manifest
    assert (
        manifest.kind == "delta"
        and manifest.encoding == "fp16"
        and manifest.n_samples == len(trainer.train_keys)
    )
    assert {"train_loss", "val_dice_mean", "val_loss"} <= set(manifest.metrics)
    text = manifest.to_json() + encoded.payload[:2048].decode("latin-1")
    for key in [*trainer.train_keys, *trainer.val_keys]:
        assert key not in text
    assert str(tmp_path) not in text and ".npz" not in text


START_REHASHED = "since it was stored; hashing it"


@pytest.mark.parametrize("flip", [False, True])
def test_a_start_model_replaced_since_it_was_stored_is_hashed_and_a_changed_one_fails_the_step(
    tmp_path: Path, trainers: dict[str, LocalTrainer], caplog: pytest.LogCaptureFixture, flip: bool
) -> None:
    """The global model is not hashed while it has the identity recorded when it was stored."""
    exp_store = new_store(tmp_path)
    start_experiment(exp_store, config(min_sites=2))
    ticket = open_step(exp_store, 0)
    for site in SITES:
        upload(exp_store, ticket, site, trainers[site])
    path = Path(exp_store.store.uri(exp_store.layout.global_model(0)))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01 if flip else 0x00
    path.with_name(".rewrite").write_bytes(bytes(data))
    os.replace(path.with_name(".rewrite"), path)  # new inode, same size
    caplog.set_level(logging.INFO, logger="jipfed.federation.round_io")
    if flip:
        before = listing(exp_store)
        with pytest.raises(IntegrityError, match=r"rounds/0/global.safetensors.*changed since"):
            aggregate_step(exp_store, 0)
        assert listing(exp_store) == before and not exp_store.has_global(1)
    else:
        assert aggregate_step(exp_store, 0).included == SITES
    assert sum(START_REHASHED in m and "its inode" in m for m in caplog.messages) == 1, caplog.messages
    if not flip:  # the new global model was recorded when stored: the next step does not hash it
        caplog.clear()
        ticket = open_step(exp_store, 1)
        for site in SITES:
            upload(exp_store, ticket, site, trainers[site])
        assert aggregate_step(exp_store, 1).included == SITES
        assert not any(START_REHASHED in m for m in caplog.messages)
