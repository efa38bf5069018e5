"""Client-level differential privacy around a mean-based strategy (DP-FedAvg at a trusted central).

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (https://arxiv.org/abs/1710.06963). Each round: every site's delta is clipped to L2 norm
C, the clipped deltas are summed with equal weight (a sample count would change the sensitivity),
Gaussian noise of std ``z_delta * C`` is added, the sum is divided by the number of included sites,
and this one noised mean update goes to the wrapped strategy (FedAvg adds it, FedAdam steps on it).

Accounting (:mod:`jipfed.privacy.accountant`): every aggregation is one release; the ledger (releases,
current C, the noise key) is server state, so a resumed experiment counts on. A release that would
take ε beyond the budget raises :class:`PrivacyBudgetExceeded` before any noise is drawn; the
experiment config refuses a plan whose rounds cannot stay within it. The noise is drawn from a key
generated at the central and kept in the server state (never sent to a site), seeded per round,
so a re-run of a crashed aggregation reproduces the same model.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from jipfed.federation.strategies.base import Strategy, StrategyState, checked_updates
from jipfed.federation.update import ModelUpdate, UpdateSource
from jipfed.privacy import client_dp
from jipfed.privacy.accountant import epsilon_after, noise_for_budget, update_noise_multiplier
from jipfed.privacy.settings import ClientDP
from jipfed.storage.layout import validate_round

#: The site id of the one noised-mean update the wrapped strategy receives.
NOISED_SITE = "dp-noised-mean"


class PrivacyBudgetExceeded(ValueError):
    """Aggregating another round would spend more than the configured ε."""


class DPFedAvg(Strategy):
    """Client-level DP around ``inner`` (a strategy built by :func:`make_strategy`).

    Args:
        inner: the wrapped strategy (a mean-based one, see ``jipfed.privacy.settings``).
        dp: the client-level DP settings.
        rounds: planned rounds (noise multiplier from the budget, refusal of a plan beyond it).
        n_sites: sites of the experiment (default count-noise of adaptive clipping).
    """

    name: ClassVar[str] = "dp_fedavg"

    def __init__(self, *, inner: Strategy, dp: ClientDP, rounds: int, n_sites: int) -> None:
        self.inner = inner
        self.dp = dp
        self.rounds = rounds
        self.n_sites = n_sites
        z = dp.noise_multiplier
        if z is None:
            z = noise_for_budget(dp.epsilon, rounds, delta=dp.delta, accountant=dp.accountant)  # type: ignore[arg-type]
        self.noise_multiplier = z
        self.count_stddev = dp.clip_count_stddev if dp.clip_count_stddev is not None else 2.0 * z
        self.update_multiplier = update_noise_multiplier(z, self.count_stddev) if dp.adaptive_clip else z
        self.planned_epsilon = self.epsilon_after(rounds)
        if dp.epsilon is not None and self.planned_epsilon > dp.epsilon:
            raise PrivacyBudgetExceeded(
                f"{rounds} rounds with noise multiplier {z} spend epsilon {self.planned_epsilon:.3f} at delta "
                f"{dp.delta}, beyond the budget {dp.epsilon}: lower the rounds or raise the noise"
            )
        self.releases = 0
        self.clip_norm = dp.clip_norm
        self._key = b""
        self._report: dict[str, Any] = {}

    def epsilon_after(self, releases: int) -> float:
        """ε after ``releases`` aggregations (opacus' accountant, this experiment's δ)."""
        return epsilon_after(
            self.noise_multiplier, releases, delta=self.dp.delta, accountant=self.dp.accountant
        )

    def configure_fit(self, round: int) -> dict[str, Any]:
        return self.inner.configure_fit(round)

    def aggregate(
        self,
        global_weights: Mapping[str, torch.Tensor],
        updates: Iterable[UpdateSource],
        round: int,
        *,
        noised_at_sites: int = 0,
    ) -> dict[str, torch.Tensor]:
        """``noised_at_sites`` > 0 (secure aggregation, :mod:`jipfed.privacy.secure_dp`): ``updates`` is
        one update, the mean of that many sites' deltas each clipped to C and noised at its site so that
        their sum carries noise of std ``noise_multiplier * C``; it is accounted, no noise is added."""
        validate_round(round)
        spent = self.epsilon_after(self.releases + 1)
        if self.dp.epsilon is not None and spent > self.dp.epsilon:
            raise PrivacyBudgetExceeded(
                f"round {round}: release {self.releases + 1} would spend epsilon {spent:.3f} > budget "
                f"{self.dp.epsilon} (delta {self.dp.delta}); the experiment must stop"
            )
        if noised_at_sites:
            return self._release_site_noised(global_weights, updates, round, spent, noised_at_sites)
        if not self._key:
            self._key = secrets.token_bytes(32)
        total: dict[str, torch.Tensor] | None = None
        n = unclipped = 0
        last = None
        for update in checked_updates(updates, round):
            delta = client_dp.site_delta(update, global_weights)
            _, within = client_dp.clip_(delta, self.clip_norm)
            unclipped += within
            n += 1
            last = update.manifest
            if total is None:
                total = delta
            else:
                for name, t in delta.items():
                    total[name].add_(t)
        if total is None or last is None:
            raise ValueError(f"no updates to aggregate in round {round}")
        generator = client_dp.noise_generator(self._key, f"round {round} release {self.releases}")
        client_dp.add_gaussian_(total, self.update_multiplier * self.clip_norm, generator)
        mean = {
            name: (total[name] / n).to(g.dtype) if name in total else torch.zeros_like(g)
            for name, g in global_weights.items()
        }
        clip_used = self.clip_norm
        noised_fraction = None
        if self.dp.adaptive_clip:
            self.clip_norm, noised_fraction = client_dp.next_clip_norm(
                self.clip_norm,
                unclipped,
                n,
                target_quantile=self.dp.target_quantile,
                clip_lr=self.dp.clip_lr,
                count_stddev=self.count_stddev,
                generator=generator,
            )
        self._record_release(spent, clip_used, noised_fraction, n)
        noised = ModelUpdate.build(
            mean,
            experiment=last.experiment,
            round=round,
            site=NOISED_SITE,
            kind="delta",
            n_samples=1,
            config_hash=last.config_hash,
        )
        return self.inner.aggregate(global_weights, [noised], round)

    def _record_release(self, spent: float, clip_used: float, noised_fraction: float | None, n: int) -> None:
        self.releases += 1
        self._report = {
            "level": "client",
            "mechanism": "gaussian",
            "accountant": self.dp.accountant,
            "delta": self.dp.delta,
            "epsilon_round": self.epsilon_after(1),
            "epsilon_total": spent,
            "epsilon_budget": self.dp.epsilon,
            "releases": self.releases,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": clip_used,
            "next_clip_norm": self.clip_norm,
            "noised_unclipped_fraction": noised_fraction,
            "sites": n,
        }

    def _release_site_noised(
        self,
        global_weights: Mapping[str, torch.Tensor],
        updates: Iterable[UpdateSource],
        round: int,
        spent: float,
        n_sites: int,
    ) -> dict[str, torch.Tensor]:
        if self.dp.adaptive_clip:
            raise ValueError(
                "adaptive clipping needs each site's clip bit at the central; noise at the sites cannot"
            )
        noised = list(checked_updates(updates, round))
        if len(noised) != 1:
            raise ValueError(f"round {round}: expected one site-noised mean update, got {len(noised)}")
        self._record_release(spent, self.clip_norm, None, n_sites)
        return self.inner.aggregate(global_weights, noised, round)

    def report(self) -> dict[str, Any]:
        """What the last aggregation spent (``{}`` before the first); the round record's ``privacy``
        (``jipfed.federation.closing`` copies it from the state's meta)."""
        return dict(self._report)

    def config(self) -> dict[str, Any]:
        return {
            "inner": self.inner.name,
            "inner_config": self.inner.config(),
            "rounds": self.rounds,
            "n_sites": self.n_sites,
            "client_dp": {k: getattr(self.dp, k) for k in self.dp.__dataclass_fields__},
        }

    def state_dict(self) -> StrategyState:
        inner = self.inner.state_dict()
        ledger = {
            "releases": self.releases,
            "clip_norm": self.clip_norm,
            "noise_key": self._key.hex(),
        }
        return StrategyState(
            strategy=self.name,
            config=self.config(),
            meta={"dp": ledger, "inner": dict(inner.meta), "privacy": self._report},
            tensors=dict(inner.tensors),
        )

    def _load_state(self, state: StrategyState) -> None:
        ledger = state.meta.get("dp")
        if not isinstance(ledger, Mapping):
            raise ValueError("dp_fedavg state has no privacy ledger")
        inner = StrategyState(
            strategy=self.inner.name,
            config=self.inner.config(),
            meta=state.meta.get("inner", {}),
            tensors=dict(state.tensors),
        )
        self.inner.load_state_dict(inner)
        self.releases = int(ledger["releases"])
        self.clip_norm = float(ledger["clip_norm"])
        self._key = bytes.fromhex(ledger["noise_key"])
        self._report = dict(state.meta.get("privacy") or {})
