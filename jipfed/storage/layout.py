"""Object key layout of the central store (see ``docs/protocol.md``)::

    experiments/<exp>/config.json                         immutable after start
    experiments/<exp>/state.json                          ExperimentState, rewritten atomically
    experiments/<exp>/rounds/<r>/global.safetensors       global model of round r
    experiments/<exp>/rounds/<r>/global.json              its manifest
    experiments/<exp>/rounds/<r>/updates/<site>.safetensors
    experiments/<exp>/rounds/<r>/updates/<site>.json      the site's manifest (the commit marker)
    experiments/<exp>/rounds/<r>/updates/<site>.sig       the site's signature of its update
    experiments/<exp>/rounds/<r>/aggregate.json           included / rejected / bounded sites, metrics
    experiments/<exp>/rounds/<r>/cohorts/<site>.json      cohort size the site reported for the round
    experiments/<exp>/rounds/<r>/strategy.safetensors     server strategy state after round r
    experiments/<exp>/rounds/<r>/strategy.json            (+ its JSON: strategy, config, meta)
    experiments/<exp>/rounds/<r>/hops/<h>.safetensors     cyclic plan: model after hop h (+ .json)
    experiments/<exp>/rounds/<r>/hops/<h>-aggregate.json  cyclic plan: what hop h included / rejected
    experiments/<exp>/final/<name>                        final model, model card, report, plots

``<r>`` is a plain decimal round number (0, 1, ..., no padding). Experiment and site names are
slugs: 1 to 64 characters from ``[A-Za-z0-9_-]``, starting with a letter or digit — no ``/``, no
``.``, so no ``..`` and no ambiguity between ``<site>.json`` and ``<site>.safetensors``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jipfed.storage.base import validate_key

_SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

MODEL_SUFFIX = ".safetensors"
MANIFEST_SUFFIX = ".json"
SIGNATURE_SUFFIX = ".sig"
#: A stored model's check record: its sha256 and the identity of the object that has it.
CHECK_SUFFIX = ".checked"


def signature_key(model_key: str) -> str:
    """The key of the detached signature of the model at ``model_key`` (``global.safetensors`` -> ``global.sig``)."""
    return _beside(model_key, SIGNATURE_SUFFIX)


def check_key(model_key: str) -> str:
    """The key of the check record of the model at ``model_key`` (``global.safetensors`` -> ``global.checked``)."""
    return _beside(model_key, CHECK_SUFFIX)


def _beside(model_key: str, suffix: str) -> str:
    if not model_key.endswith(MODEL_SUFFIX):
        raise ValueError(f"not a model key: {model_key!r}")
    return model_key[: -len(MODEL_SUFFIX)] + suffix


def validate_slug(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a safe slug, else raise ValueError naming it."""
    if not isinstance(name, str) or not _SLUG_RE.match(name):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-64 characters from letters, digits, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def validate_round(round_: int) -> int:
    """Return ``round_`` if it is an int >= 0 (bool refused), else raise ValueError."""
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise ValueError(f"round must be an int >= 0, got {round_!r}")
    return round_


@dataclass(frozen=True)
class ExperimentLayout:
    """The keys of one experiment. ``experiment`` is validated as a slug."""

    experiment: str

    def __post_init__(self) -> None:
        validate_slug(self.experiment, "experiment name")

    @property
    def prefix(self) -> str:
        """``experiments/<exp>/`` — every key of this experiment starts with it."""
        return f"experiments/{self.experiment}/"

    def config(self) -> str:
        return f"{self.prefix}config.json"

    def state(self) -> str:
        return f"{self.prefix}state.json"

    @property
    def rounds_prefix(self) -> str:
        return f"{self.prefix}rounds/"

    def round_prefix(self, round_: int) -> str:
        return f"{self.rounds_prefix}{validate_round(round_)}/"

    def global_model(self, round_: int) -> str:
        return f"{self.round_prefix(round_)}global{MODEL_SUFFIX}"

    def global_manifest(self, round_: int) -> str:
        return f"{self.round_prefix(round_)}global{MANIFEST_SUFFIX}"

    def updates_prefix(self, round_: int) -> str:
        return f"{self.round_prefix(round_)}updates/"

    def update(self, round_: int, site: str) -> str:
        return f"{self.updates_prefix(round_)}{validate_slug(site, 'site id')}{MODEL_SUFFIX}"

    def update_manifest(self, round_: int, site: str) -> str:
        return f"{self.updates_prefix(round_)}{validate_slug(site, 'site id')}{MANIFEST_SUFFIX}"

    def update_signature(self, round_: int, site: str) -> str:
        """The site's detached Ed25519 signature of its update (:mod:`jipfed.federation.signing`)."""
        return f"{self.updates_prefix(round_)}{validate_slug(site, 'site id')}{SIGNATURE_SUFFIX}"

    def aggregate(self, round_: int) -> str:
        return f"{self.round_prefix(round_)}aggregate.json"

    def strategy_state(self, round_: int) -> str:
        """Server strategy state (e.g. FedAdam moments) after aggregating round ``round_``."""
        return f"{self.round_prefix(round_)}strategy{MODEL_SUFFIX}"

    def strategy_state_manifest(self, round_: int) -> str:
        return f"{self.round_prefix(round_)}strategy{MANIFEST_SUFFIX}"

    def hop_model(self, round_: int, hop: int) -> str:
        """Cyclic plan: the model hop ``hop`` of round ``round_`` produced (the next hop's start)."""
        return f"{self.round_prefix(round_)}hops/{validate_round(hop)}{MODEL_SUFFIX}"

    def hop_manifest(self, round_: int, hop: int) -> str:
        return f"{self.round_prefix(round_)}hops/{validate_round(hop)}{MANIFEST_SUFFIX}"

    def hop_record(self, round_: int, hop: int) -> str:
        """Cyclic plan: what hop ``hop`` (not the round's last) included or rejected."""
        return f"{self.round_prefix(round_)}hops/{validate_round(hop)}-aggregate.json"

    def dispatch(self, round_: int, step: int) -> str:
        """What the central sent out for plan step ``step`` (ticket, transport, deadline)."""
        return f"{self.round_prefix(round_)}steps/{validate_round(step)}/dispatch.json"

    def cohort(self, round_: int, site: str) -> str:
        """The cohort size ``site`` reported when it took round ``round_``'s work (bounds its n_samples)."""
        return f"{self.round_prefix(round_)}cohorts/{validate_slug(site, 'site id')}.json"

    def failures_prefix(self, round_: int) -> str:
        return f"{self.round_prefix(round_)}failures/"

    def site_failure(self, round_: int, site: str) -> str:
        """Why ``site`` delivered no update in round ``round_`` (its own report, or a timeout)."""
        return f"{self.failures_prefix(round_)}{validate_slug(site, 'site id')}.json"

    @property
    def final_prefix(self) -> str:
        return f"{self.prefix}final/"

    def final(self, name: str) -> str:
        """``final/<name>``; ``name`` may contain ``/`` (``plots/loss.png``) but no ``..``."""
        return validate_key(f"{self.final_prefix}{name}")

    def site_of_update(self, round_: int, key: str) -> str | None:
        """The site whose update *manifest* ``key`` is in round ``round_``, else None."""
        head = self.updates_prefix(round_)
        if not (key.startswith(head) and key.endswith(MANIFEST_SUFFIX)):
            return None
        site = key[len(head) : -len(MANIFEST_SUFFIX)]
        return site if _SLUG_RE.match(site) else None

    def round_of_key(self, key: str) -> int | None:
        """The round number a key under ``rounds/<r>/`` belongs to, else None."""
        if not key.startswith(self.rounds_prefix):
            return None
        head = key[len(self.rounds_prefix) :].split("/", 1)[0]
        return int(head) if head.isdigit() and str(int(head)) == head else None
