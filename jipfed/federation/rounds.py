"""The central side of the round protocol: one function per action a central DAG task performs.

``start_experiment`` → for each plan step: ``open_step`` → (sites train and upload; each upload
goes through ``accept_update``) → ``aggregate_step`` → … → ``finalize``. See
``docs/protocol.md``. Every function reads what it needs from the object store and writes
write-once objects, so a cleared or crashed DAG run can call it again.

This module is the public facade; the actions live in cohesive modules:

* :mod:`~jipfed.federation.round_start`: start / fail an experiment, open a step (its ticket);
* :mod:`~jipfed.federation.acceptance`: may a site upload now, check its update once while it
  streams into the store (:mod:`~jipfed.federation.payload_stream`), record the check
  (:mod:`~jipfed.federation.arrival`) and commit it;
* :mod:`~jipfed.federation.decision`: which updates a step uses (from the arrival checks, no
  update read), rejects, misses; the quorum;
* :mod:`~jipfed.federation.compute`: the step's output model and server strategy state, each
  stored update read once (hashed on the way; one that changed since arrival is excluded);
* :mod:`~jipfed.federation.closing`: ``aggregate_step`` (decide → record → outputs → state);
* :mod:`~jipfed.federation.finalize`: the final model, model card and metrics;
* :mod:`~jipfed.federation.round_io`: the store keys of a step's models and records, shared.

Round numbering: ``rounds/<r>/global`` is the model round ``r`` starts from; the round's updates
and ``aggregate.json`` live under ``rounds/<r>/`` and its result is ``rounds/<r+1>/global``. A
cyclic round's hops pass their models on through ``rounds/<r>/hops/<h>``.
"""

from __future__ import annotations

from jipfed.federation.acceptance import (
    accept_update,
    check_upload_allowed,
    commit_checked,
    finish_upload,
    open_upload,
)
from jipfed.federation.closing import RECORD_FORMAT, aggregate_step
from jipfed.federation.decision import NO_UPDATE_REASON
from jipfed.federation.finalize import FINAL_METRICS, FINAL_MODEL, MODEL_CARD, finalize
from jipfed.federation.round_start import fail_experiment, initial_weights, open_step, start_experiment
from jipfed.federation.tickets import ProtocolError, QuorumNotMet, StepTicket, UpdateRefused, load_config

__all__ = [
    "FINAL_METRICS",
    "FINAL_MODEL",
    "MODEL_CARD",
    "NO_UPDATE_REASON",
    "RECORD_FORMAT",
    "ProtocolError",
    "QuorumNotMet",
    "StepTicket",
    "UpdateRefused",
    "accept_update",
    "aggregate_step",
    "check_upload_allowed",
    "commit_checked",
    "fail_experiment",
    "finalize",
    "finish_upload",
    "initial_weights",
    "load_config",
    "open_step",
    "open_upload",
    "start_experiment",
]
