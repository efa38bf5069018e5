"""Server optimisers on the pseudo-gradient: the shared base of FedAvgM, FedAdagrad, FedAdam, FedYogi.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization",
ICLR 2021 (https://arxiv.org/abs/2003.00295), Algorithm 2.

Each round the pseudo-gradient is ``delta = mean_w(site deltas)`` (sample-weighted, where the paper
uses the plain mean; formed from the deltas, so a coordinate no site changed is exactly 0), and a
subclass turns it into the next global value of every trainable float weight with its server state
(momentum, moments). Normalisation running statistics and other buffers
(:func:`~jipfed.federation.strategies.pseudo_gradient.is_buffer`) and integer tensors are never
stepped by the server optimiser: they take FedAvg's value (``global + delta``) and have no state.
State tensors are per trainable tensor name, in the accumulation dtype (float32 for float32
models), named ``<buffer>/<tensor name>``. Rounds must increase strictly: aggregating the same round
twice would apply the server step twice, so it is refused.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from jipfed.federation.aggregate import INTEGER_MODES, accumulation_dtype
from jipfed.federation.strategies.base import (
    Strategy,
    StrategyState,
    accumulate_dtype_of,
    check_float,
    checked_updates,
)
from jipfed.federation.strategies.pseudo_gradient import is_buffer, mean_delta
from jipfed.federation.strategies.schedules import Schedule
from jipfed.federation.strategies.site_options import SiteOptions
from jipfed.federation.update import UpdateManifest, UpdateSource
from jipfed.storage.layout import validate_round


class FedOpt(Strategy):
    """Base of the server-optimiser strategies; subclasses define ``buffers`` and :meth:`_step`.

    Args:
        eta: server learning rate (> 0).
        accumulate_dtype: as for FedAvg; also the dtype of the state and of the server step.
        integer_mode: as for FedAvg.
        server_lr_schedule: :class:`~jipfed.federation.strategies.schedules.Schedule` spec scaling
            ``eta`` per round (None = constant).
        local_patterns, local_lr_schedule: see :mod:`~jipfed.federation.strategies.site_options`.
    """

    buffers: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        *,
        eta: float,
        accumulate_dtype: str | None = None,
        integer_mode: str = "max",
        server_lr_schedule: dict[str, Any] | None = None,
        local_patterns: list[str] | None = None,
        local_lr_schedule: dict[str, Any] | None = None,
    ) -> None:
        self.eta = check_float(eta, "eta", low=0.0, low_open=True)
        self.server_lr = Schedule.from_spec(server_lr_schedule, "server_lr_schedule")
        self.site_options = SiteOptions.build(local_patterns, local_lr_schedule)
        self._lr = self.eta
        self._dtype = accumulate_dtype_of(accumulate_dtype)
        if integer_mode not in INTEGER_MODES:
            raise ValueError(f"integer_mode must be one of {INTEGER_MODES}, got {integer_mode!r}")
        self.accumulate_dtype = accumulate_dtype
        self.integer_mode = integer_mode
        self._state: dict[str, dict[str, torch.Tensor]] = {b: {} for b in self.buffers}
        self._steps = 0
        self._last_round: int | None = None

    def aggregate(
        self, global_weights: Mapping[str, torch.Tensor], updates: Iterable[UpdateSource], round: int
    ) -> dict[str, torch.Tensor]:
        validate_round(round)
        if self._last_round is not None and round <= self._last_round:
            raise ValueError(f"round {round} is not after the last aggregated round {self._last_round}")
        self._lr = self.eta * (1.0 if self.server_lr is None else self.server_lr.factor(round))
        delta = mean_delta(
            global_weights,
            checked_updates(updates, round),
            weight=self._site_weight,
            accumulate_dtype=self._dtype,
            integer_mode=self.integer_mode,
        )
        out: dict[str, torch.Tensor] = {}
        for name, g in global_weights.items():
            d = delta.pop(name)
            if not g.is_floating_point():
                out[name] = g + d
                continue
            dtype = accumulation_dtype(g.dtype, self._dtype)
            if is_buffer(name):
                out[name] = torch.add(g.to(dtype), d.to(dtype)).to(g.dtype)  # FedAvg's value, no server step
            else:
                out[name] = self._step(name, g.to(dtype), d.to(dtype, copy=True)).to(g.dtype)
        self._steps += 1
        self._last_round = round
        return out

    def _site_weight(self, manifest: UpdateManifest) -> float:
        """A site's weight in the pseudo-gradient (its sample count)."""
        return float(manifest.n_samples)

    def _buffer(self, buffer: str, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """State tensor ``buffer/name``, created as ``full_like(like, fill)`` on first use."""
        state = self._state[buffer]
        if name not in state:
            state[name] = torch.full_like(like, fill)
        elif state[name].shape != like.shape or state[name].dtype != like.dtype:
            raise ValueError(
                f"state {buffer}/{name} is {tuple(state[name].shape)} {state[name].dtype}, "
                f"model is {tuple(like.shape)} {like.dtype}"
            )
        return state[name]

    @abstractmethod
    def _step(self, name: str, g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """New value of float tensor ``name`` from global ``g`` and pseudo-gradient ``delta`` (may be overwritten)."""

    def configure_fit(self, round: int) -> dict[str, Any]:
        return {**super().configure_fit(round), **self.site_options.fit(round)}

    def config(self) -> dict[str, Any]:
        out = {"eta": self.eta, "accumulate_dtype": self.accumulate_dtype, "integer_mode": self.integer_mode}
        if self.server_lr is not None:
            out["server_lr_schedule"] = self.server_lr.to_spec()
        return {**out, **self.site_options.config()}

    def state_dict(self) -> StrategyState:
        tensors = {
            f"{buffer}/{name}": t for buffer, by_name in self._state.items() for name, t in by_name.items()
        }
        return StrategyState(
            strategy=self.name,
            config=self.config(),
            meta={"steps": self._steps, "last_round": self._last_round},
            tensors=tensors,
        )

    def _load_state(self, state: StrategyState) -> None:
        meta = dict(state.meta)
        steps, last_round = meta.get("steps"), meta.get("last_round")
        if set(meta) != {"steps", "last_round"} or not isinstance(steps, int) or steps < 0:
            raise ValueError(
                f"state meta must be {{'steps': int >= 0, 'last_round': int | None}}, got {meta}"
            )
        if last_round is not None:
            validate_round(last_round)
        restored: dict[str, dict[str, torch.Tensor]] = {b: {} for b in self.buffers}
        for key, tensor in state.tensors.items():
            buffer, sep, name = key.partition("/")
            if not sep or buffer not in restored or not name:
                raise ValueError(
                    f"unexpected state tensor {key!r} for {self.name!r} (buffers {self.buffers})"
                )
            restored[buffer][name] = tensor.clone()
        self._state, self._steps, self._last_round = restored, steps, last_round


class _AdaptiveFedOpt(FedOpt):
    """FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2): moments ``m``, ``v``.

    ``m = beta1 m + (1 - beta1) delta``; ``v`` per :meth:`_second_moment` starting from
    ``v_{-1} = tau^2`` as in the paper; ``x = x + eta m / (sqrt(v) + tau)``. No bias correction.
    """

    buffers: ClassVar[tuple[str, ...]] = ("m", "v")

    def __init__(
        self,
        *,
        eta: float,
        beta1: float,
        beta2: float,
        tau: float,
        accumulate_dtype: str | None = None,
        integer_mode: str = "max",
        **options: Any,
    ) -> None:
        super().__init__(eta=eta, accumulate_dtype=accumulate_dtype, integer_mode=integer_mode, **options)
        self.beta1 = check_float(beta1, "beta1", low=0.0, high=1.0, high_open=True)
        self.beta2 = check_float(beta2, "beta2", low=0.0, high=1.0, high_open=True)
        self.tau = check_float(tau, "tau", low=0.0, low_open=True)

    @abstractmethod
    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """Update ``v`` in place from the squared pseudo-gradient."""

    def _step(self, name: str, g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        m = self._buffer("m", name, delta)
        v = self._buffer("v", name, delta, fill=self.tau**2)
        m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        delta_sq = delta.mul_(delta)
        self._second_moment(v, delta_sq)
        denom = torch.sqrt(v, out=delta_sq).add_(self.tau)
        return torch.addcdiv(g, m, denom, value=self._lr)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}


class ServerSGD(FedOpt):
    """Plain server SGD ``x = x + server_lr * delta``: the base of FedNova and SCAFFOLD.

    Args: ``server_lr`` (> 0, default 1.0) and the :class:`FedOpt` options.
    """

    buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        server_lr: float = 1.0,
        accumulate_dtype: str | None = None,
        integer_mode: str = "max",
        **options: Any,
    ) -> None:
        super().__init__(
            eta=server_lr, accumulate_dtype=accumulate_dtype, integer_mode=integer_mode, **options
        )

    def _step(self, name: str, g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.add(g, delta, alpha=self._lr)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        return {"server_lr": cfg.pop("eta"), **cfg}
