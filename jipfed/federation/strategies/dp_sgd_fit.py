"""Sample-level DP: every site trains with DP-SGD; the wrapped strategy aggregates as usual.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (https://arxiv.org/abs/1607.00133).
The wrapper only adds ``dp_sgd`` (the :class:`~jipfed.privacy.settings.SampleDP` settings) to what
each site trains with (:meth:`configure_fit`); the site's trainer runs opacus and reports its ε in
the update's metrics (``dp_epsilon``). Server state is the wrapped strategy's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from jipfed.federation.strategies.base import Strategy, StrategyState
from jipfed.federation.update import UpdateSource
from jipfed.privacy.settings import SampleDP, settings_dict


class DPSGDFit(Strategy):
    """``inner`` with DP-SGD at every site (``dp``: the sample-level settings)."""

    name: ClassVar[str] = "dp_sgd"

    def __init__(self, *, inner: Strategy, dp: SampleDP) -> None:
        self.inner = inner
        self.dp = dp

    def configure_fit(self, round: int) -> dict[str, Any]:
        return {**self.inner.configure_fit(round), "dp_sgd": settings_dict(self.dp)}

    def aggregate(
        self, global_weights: Mapping[str, torch.Tensor], updates: Iterable[UpdateSource], round: int
    ) -> dict[str, torch.Tensor]:
        return self.inner.aggregate(global_weights, updates, round)

    def report(self) -> dict[str, Any]:
        return self.inner.report()

    def config(self) -> dict[str, Any]:
        return {
            "inner": self.inner.name,
            "inner_config": self.inner.config(),
            "sample_dp": settings_dict(self.dp),
        }

    def state_dict(self) -> StrategyState:
        return self.inner.state_dict()

    def load_state_dict(self, state: StrategyState) -> None:
        """The inner strategy's state; a wrapper around this one (client-level DP) labels it with this
        strategy's name and config, which are checked here and then handed on as the inner's."""
        if state.strategy == self.name:
            if dict(state.config) != self.config():
                raise ValueError(
                    f"state config {dict(state.config)} differs from this strategy's {self.config()}"
                )
            state = StrategyState(
                strategy=self.inner.name,
                config=self.inner.config(),
                meta=dict(state.meta),
                tensors=state.tensors,
            )
        self.inner.load_state_dict(state)
