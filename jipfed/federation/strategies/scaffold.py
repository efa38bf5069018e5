"""SCAFFOLD: stochastic controlled averaging; control variates correct each site's client drift.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020 (https://arxiv.org/abs/1910.06378), Algorithm 1.

The server control ``c`` travels in the global model as extra tensors ``control/<weight>`` (one
per trainable float weight; the round-0 model has none, meaning ``c = 0``). Each site keeps its
own control ``c_i``, trains with every gradient corrected by ``c - c_i``, sets ``c_i+`` to the mean
of the round's local gradients (option II for plain SGD; taken directly so that it also holds
for Adam) and sends ``c_i+ - c_i`` as ``control/<weight>`` beside
its model delta (:class:`~jipfed.training.local.LocalTrainer`, fit setting ``scaffold``). Both
are validated like any tensor (names, shapes, dtypes, NaN/Inf; see
:func:`jipfed.federation.validation.check_specs`). The server steps
``x = x + server_lr * delta`` (sample-weighted mean delta) and ``c = c + mean_i(c_i+ - c_i)``
(the mean over this round's sites, i.e. the paper's ``|S| / N`` factor taken as 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from jipfed.federation.aggregate import WeightedMean
from jipfed.federation.strategies.fedopt import ServerSGD
from jipfed.federation.update import (
    UpdateManifest,
    UpdateSource,
    control_name,
    control_specs,
    spec_of,
    split_controls,
)


@dataclass(frozen=True)
class _ModelPart:
    """An update without its control variates (what the server optimiser averages)."""

    manifest: UpdateManifest
    tensors: Mapping[str, torch.Tensor]


class Scaffold(ServerSGD):
    """Args: ``server_lr`` (> 0, default 1.0) and the :class:`FedOpt` options."""

    name: ClassVar[str] = "scaffold"

    def configure_fit(self, round: int) -> dict[str, Any]:
        return {**super().configure_fit(round), "scaffold": True}

    def aggregate(
        self, global_weights: Mapping[str, torch.Tensor], updates: Iterable[UpdateSource], round: int
    ) -> dict[str, torch.Tensor]:
        model, controls = split_controls(global_weights)
        names = [n[len(control_name("")) :] for n in control_specs(spec_of(model))]
        corrections = WeightedMean(accumulate_dtype=self._dtype)

        def model_parts() -> Iterator[_ModelPart]:
            for update in updates:
                part, site_controls = split_controls(update.tensors)
                if sorted(site_controls) != sorted(names):
                    raise ValueError(
                        f"SCAFFOLD: update from site {update.manifest.site!r} in round {update.manifest.round} "
                        f"carries control variates for {len(site_controls)} of {len(names)} weights"
                    )
                corrections.add(site_controls, 1.0)
                yield _ModelPart(update.manifest, part)

        out = super().aggregate(model, model_parts(), round)
        mean_correction = corrections.result()
        for name in names:
            c = controls.get(name)
            new = mean_correction[name] if c is None else c + mean_correction[name]
            out[control_name(name)] = new
        return out
