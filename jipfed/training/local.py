"""Site-side learning: the MONAI-style client contract ``train`` / ``get_weights`` / ``evaluate``.

:class:`LocalTrainer` owns one site's model and data split. The simulator and the Airflow site
DAG call it the same way::

    trainer = LocalTrainer(config, SiteData.from_dir(preprocessed_dir))
    result = trainer.train(global_weights, mu=0.01, round=r)   # -> LocalResult
    metrics = trainer.evaluate(global_weights)                  # held-out split of this site

Same config, data, starting weights and round give the same result on CPU. Each round starts
a fresh optimiser (its state never leaves the site). With ``bn_policy="local"`` the BatchNorm
running statistics persist in the trainer between rounds (persist them across processes with
:meth:`get_weights` / :meth:`load_weights`) and are excluded from :class:`LocalResult` weights.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from jipfed.federation.strategies.fedprox import proximal_term
from jipfed.federation.update import is_buffer, split_controls
from jipfed.privacy.poisson_sampling import dp_sample_rate
from jipfed.privacy.sample_dp import DPSGD, augmented_views, check_model
from jipfed.training.config import TrainConfig
from jipfed.training.data import CaseDataset, CaseRecord, SiteData, load_case, make_loader
from jipfed.training.fit import FitSettings
from jipfed.training.metrics import RegionDice, classification_metrics
from jipfed.training.models import build_model, check_input_size, shared_parameter_names

logger = logging.getLogger(__name__)

#: Site-state key of the DP-SGD accountant history.
DP_HISTORY = "dp/history"


@dataclass(frozen=True)
class LocalResult:
    """Outcome of one local round.

    Attributes:
        weights: shared state-dict entries (CPU tensors) after training.
        n_samples: training cases at this site (the FedAvg weight).
        metrics: ``train_loss`` (mean task loss over all steps), ``train_loss_last`` (mean over
            the last pass), ``train_loss_first`` (first step), ``proximal`` (mean FedProx term;
            0 when mu = 0), ``mu``, ``epochs`` (passes, fractional in step mode); the loss entries
            are absent when every DP-SGD Poisson batch of the round (or of its last pass) was empty.
        steps: optimiser steps taken.
        seconds: wall-clock time of the training loop.
        controls: SCAFFOLD only: the site's control correction ``c_i+ - c_i`` per trainable
            shared weight (zero for site-local entries); empty otherwise.
        privacy: DP-SGD only: ``epsilon`` (this site's total so far), ``delta``, ``noise_multiplier``.
    """

    weights: dict[str, torch.Tensor]
    n_samples: int
    metrics: dict[str, float]
    steps: int
    seconds: float
    controls: dict[str, torch.Tensor] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _derive_seed(seed: int, round_: int | None) -> int:
    digest = hashlib.sha256(f"jipfed-train:{seed}:{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class LocalTrainer:
    """Trains and evaluates one site's model on its preprocessed cases.

    Args:
        config: the experiment's training configuration.
        data: this site's cases; split into train / held-out val by ``config.val_fraction``
            and ``config.seed`` (see :meth:`SiteData.split`).
        device: torch device; None = ``"cuda"`` when available, else ``"cpu"``. On ``"cuda"``
            without an index and more than one GPU the model runs under DataParallel.

    Attributes:
        model: the unwrapped network (its state dict never carries a ``module.`` prefix).
        shared_names: state-dict entries exchanged with the central (see ``bn_policy``).
        train_records, val_records: this site's split.
        in_channels: image channels, read from the first case.
    """

    def __init__(self, config: TrainConfig, data: SiteData, device: str | torch.device | None = None) -> None:
        if len(data) == 0:
            raise ValueError("site has no cases")
        self.config = config
        self.device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.train_records, self.val_records = data.split(config.val_fraction, config.seed)
        image, _ = load_case(data.records[0].path)
        self.in_channels = int(image.shape[0])
        check_input_size(config, self.in_channels, tuple(image.shape[1:]))
        self.model = build_model(config, in_channels=self.in_channels).to(self.device)
        self.shared_names = shared_parameter_names(self.model, config.bn_policy)
        #: shared entries this site keeps for itself (FedBN-style ``local_patterns``); never overwritten
        self.local_names: frozenset[str] = frozenset()
        #: SCAFFOLD's site control ``c_i`` and FedDyn's linearised gradient ``g_i``: site state
        self.site_control: dict[str, torch.Tensor] = {}
        self.dyn_gradient: dict[str, torch.Tensor] = {}
        #: DP-SGD accountant history ``(noise, sample rate, steps)`` of this site: site state
        self.dp_history: list[tuple[float, float, int]] = []
        #: ChaCha20 key of DP-SGD's noise and Poisson batches; None = fresh OS randomness (tests fix it)
        self.dp_key: bytes | None = None
        self._use_amp = config.amp and self.device.type == "cuda"
        self._parallel = (
            self.device.type == "cuda" and self.device.index is None and torch.cuda.device_count() > 1
        )
        logger.info(
            "LocalTrainer: %s/%s/%s on %s, %d train / %d val cases, %d channels, amp=%s, parallel=%s",
            config.task,
            config.model,
            config.size,
            self.device,
            len(self.train_records),
            len(self.val_records),
            self.in_channels,
            self._use_amp,
            self._parallel,
        )

    # -- weights ---------------------------------------------------------------------------

    def get_weights(self) -> dict[str, torch.Tensor]:
        """Full state dict (parameters and buffers, site-local BN stats included) as CPU copies."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load a full or shared-only state dict (e.g. restoring a site's persisted local BN stats).

        Every shared entry must be present; unknown names and shape mismatches are errors.
        """
        self._load_into(self.model, weights, shared_only=False)

    def _load_into(self, model: nn.Module, weights: Mapping[str, torch.Tensor], *, shared_only: bool) -> None:
        """Copy ``weights`` into ``model``; control variates are ignored, site-local entries kept."""
        weights, _ = split_controls(weights)
        state = model.state_dict()
        unknown = sorted(set(weights) - set(state))
        missing = sorted(set(self.shared_names) - set(weights))
        if unknown or missing:
            raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unknown {unknown[:5]}")
        names = [n for n in self.shared_names if n not in self.local_names] if shared_only else list(weights)
        with torch.no_grad():
            for name in names:
                src, dst = weights[name], state[name]
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"{name}: shape {tuple(src.shape)} != model's {tuple(dst.shape)}")
                if src.is_floating_point() and not torch.isfinite(src).all():
                    raise ValueError(f"{name}: contains NaN or inf")
                dst.copy_(src.to(dst.device, dst.dtype))

    def site_state(self) -> dict[str, torch.Tensor]:
        """What the site must keep between rounds besides its data (CPU copies, for safetensors).

        ``local/<name>``: site-local entries (FedBN-style), ``control/<name>``: SCAFFOLD's ``c_i``,
        ``dyn/<name>``: FedDyn's ``g_i``, ``dp/history``: the DP-SGD accountant's history. A site that builds a new trainer every round restores
        it with :meth:`load_site_state`. None of it is sent to the central.
        """
        state = self.model.state_dict()
        out = {f"local/{n}": state[n].detach().to("cpu", copy=True) for n in sorted(self.local_names)}
        for prefix, tensors in (("control/", self.site_control), ("dyn/", self.dyn_gradient)):
            out.update({prefix + n: t.detach().to("cpu", copy=True) for n, t in tensors.items()})
        if self.dp_history:
            out[DP_HISTORY] = torch.tensor(self.dp_history, dtype=torch.float64)
        return out

    def load_site_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`site_state` output; ValueError naming an entry that does not fit the model."""
        params = dict(self.model.named_parameters())
        local, control, dyn = {}, {}, {}
        state = dict(state)
        history = state.pop(DP_HISTORY, None)
        if history is not None and (history.ndim != 2 or history.shape[1] != 3):
            raise ValueError(
                f"site state entry {DP_HISTORY!r} must be (phases, 3), got {tuple(history.shape)}"
            )
        for key, tensor in state.items():
            prefix, sep, name = key.partition("/")
            target = {"local": local, "control": control, "dyn": dyn}.get(prefix) if sep else None
            known = name in self.shared_names if prefix == "local" else name in params
            if target is None or not known:
                raise ValueError(f"site state entry {key!r} does not fit this model")
            like = self.model.state_dict()[name] if prefix == "local" else params[name]
            if tuple(tensor.shape) != tuple(like.shape):
                raise ValueError(
                    f"site state entry {key!r}: shape {tuple(tensor.shape)} != {tuple(like.shape)}"
                )
            target[name] = tensor.to(like.device, like.dtype)
        with torch.no_grad():
            model_state = self.model.state_dict()
            for name, tensor in local.items():
                model_state[name].copy_(tensor)
        self.local_names = frozenset(local)
        self.site_control, self.dyn_gradient = control, dyn
        self.dp_history = (
            [] if history is None else [(float(z), float(q), int(t)) for z, q, t in history.tolist()]
        )

    def _wrapped(self, model: nn.Module) -> nn.Module:
        return nn.DataParallel(model) if self._parallel else model

    # -- losses ------------------------------------------------------------------------------

    def _loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self.config.task == "classification":
            return nn.CrossEntropyLoss()
        from monai.losses import DiceLoss

        # Regions overlap, so each channel is its own binary problem: soft Dice + BCE on sigmoids.
        # (monai's DiceCELoss would apply a softmax cross-entropy across the 3 channels.)
        dice = DiceLoss(sigmoid=True)
        bce = nn.BCEWithLogitsLoss()
        return lambda logits, target: dice(logits, target) + bce(logits, target)

    def _optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)

    def _set_local_names(self, patterns: tuple[str, ...], global_weights: Mapping[str, torch.Tensor]) -> None:
        """Adopt the site-local entries matching ``patterns``; the first time, they start from the global model's values."""
        if not patterns:
            return  # no (new) patterns: entries adopted in earlier rounds stay local
        names = frozenset(n for n in self.shared_names if any(fnmatch.fnmatchcase(n, p) for p in patterns))
        if names and not self.local_names:
            self._load_into(self.model, global_weights, shared_only=True)
        self.local_names = names

    def _controlled(self) -> dict[str, nn.Parameter]:
        """Trainable shared parameters that carry SCAFFOLD controls / FedDyn state (not site-local)."""
        return {
            n: p
            for n, p in self.model.named_parameters()
            if p.requires_grad and n in self.shared_names and n not in self.local_names and not is_buffer(n)
        }

    # -- contract ----------------------------------------------------------------------------

    def train(
        self,
        global_weights: Mapping[str, torch.Tensor],
        *,
        mu: float | None = None,
        round: int | None = None,
        fit: FitSettings | None = None,
    ) -> LocalResult:
        """Train from ``global_weights`` for ``config.epochs`` passes or ``config.steps`` steps.

        Args:
            global_weights: at least every shared entry (:attr:`shared_names`); site-local BN
                statistics in it are ignored under ``bn_policy="local"``.
            mu: FedProx weight; None = ``config.fedprox_mu``; 0 = plain local training.
            round: round number, mixed into the seed so rounds draw different shuffles / flips.
            fit: the round's settings from the strategy (learning-rate scale, site-local
                entries, SCAFFOLD, FedDyn; its ``mu`` is used when ``mu`` is None). With SCAFFOLD
                the server control is read from ``global_weights``' ``control/<weight>`` entries
                (absent = 0).

        Returns:
            :class:`LocalResult` with the shared entries after training.
        """
        cfg = self.config
        fit = fit or FitSettings()
        mu = fit.mu if mu is None else mu
        mu = cfg.fedprox_mu if mu is None else mu
        if not math.isfinite(mu) or mu < 0:
            raise ValueError(f"mu must be a finite number >= 0, got {mu}")
        seed = _derive_seed(cfg.seed, round)
        dataset = CaseDataset(self.train_records, cfg.task, augment=cfg.augment, seed=seed)
        if len(dataset) == 0:
            raise ValueError("no training cases at this site (after the split / grade filter)")
        self._set_local_names(fit.local_patterns, global_weights)
        self._load_into(self.model, global_weights, shared_only=True)
        loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=seed, num_workers=cfg.num_workers)
        total = cfg.steps if cfg.steps is not None else cfg.epochs * len(loader)
        self._set_trainable(fit, round)
        params = [p for p in self.model.parameters() if p.requires_grad]
        anchor = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        lr = cfg.lr * fit.lr_scale
        optimizer = self._optimizer(params, lr)
        drift = _DriftCorrection(self, global_weights, fit, anchor, lr)
        scaler = torch.amp.GradScaler("cuda", enabled=self._use_amp)
        loss_fn = self._loss_fn()
        net = self._wrapped(self.model)
        dp = self._dp_sgd(fit, mu, total, len(dataset), round)
        if dp is not None:
            loader = dp.loader(dataset, cfg.batch_size, cfg.num_workers)
            net, optimizer, _ = dp.wrap(self.model, optimizer, min(cfg.batch_size, len(dataset)))
        average = _IterateAverage(params, dp.settings.ema_decay if dp is not None else None)
        views = dp.settings.augment_views if dp is not None else 1
        view_generator = torch.Generator().manual_seed(seed)
        net.train()
        losses: list[float] = []
        prox_sum = 0.0
        last_pass: list[float] = []
        step, epoch = 0, 0
        start = time.perf_counter()
        cuda_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            while step < total:
                dataset.set_epoch(epoch)
                last_pass = []
                epoch_start = time.perf_counter()
                for batch in loader:
                    if batch is None:  # an empty Poisson batch: DP-SGD's step of noise alone
                        optimizer.step_without_cases()
                    else:
                        image = batch["image"].to(self.device, non_blocking=True)
                        target = batch["label"].to(self.device, non_blocking=True)
                        image, target = augmented_views(image, target, views, view_generator)
                        optimizer.zero_grad(set_to_none=True)
                        with torch.autocast(
                            device_type=self.device.type, dtype=torch.float16, enabled=self._use_amp
                        ):
                            task_loss = loss_fn(net(image), target)
                        loss = task_loss.float()
                        if mu > 0:
                            prox = proximal_term(self.model, anchor, mu)
                            loss = loss + prox
                            prox_sum += float(prox.detach())
                        loss = drift.regularised(loss)
                        value = float(task_loss.detach())
                        if not math.isfinite(value) or not math.isfinite(float(loss.detach())):
                            raise FloatingPointError(f"non-finite loss {value} at step {step} (round {round})")
                        scaler.scale(loss).backward()
                        drift.correct_gradients(scaler.get_scale() if scaler.is_enabled() else 1.0)
                        scaler.step(optimizer)
                        scaler.update()
                        losses.append(value)
                        last_pass.append(value)
                    average.update()
                    step += 1
                    if step >= total:
                        break
                logger.info(
                    "round %s epoch %d: loss %.4f over %d steps (%.1f s)",
                    round,
                    epoch,
                    _mean(last_pass),
                    len(last_pass),
                    time.perf_counter() - epoch_start,
                )
                epoch += 1
        seconds = time.perf_counter() - start
        average.apply()
        privacy: dict[str, float] = {}
        if dp is not None:
            epsilon = dp.finish(net, step, dp_sample_rate(cfg.batch_size, len(dataset)))
            self.dp_history = dp.history
            privacy = {
                "epsilon": epsilon,
                "delta": dp.settings.delta,
                "noise_multiplier": dp.noise_multiplier,
            }
        controls = drift.finish(step)
        state = self.model.state_dict()
        weights = {n: state[n].detach().to("cpu", copy=True) for n in self.shared_names}
        metrics = {"mu": float(mu), "epochs": step / len(loader), "lr": lr}
        if losses:  # none when every DP-SGD batch of the round came out empty
            metrics.update(train_loss=_mean(losses), train_loss_first=losses[0], proximal=prox_sum / len(losses))
        if last_pass:
            metrics["train_loss_last"] = _mean(last_pass)
        return LocalResult(
            weights=weights,
            n_samples=len(dataset),
            metrics=metrics,
            steps=step,
            seconds=seconds,
            controls=controls,
            privacy=privacy,
        )

    def _set_trainable(self, fit: FitSettings, round_: int | None) -> None:
        """Freeze the parameters DP-SGD's ``trainable`` patterns leave out (all train otherwise)."""
        patterns = fit.dp_sgd.trainable if fit.dp_sgd is not None else None
        named = list(self.model.named_parameters())
        train = {n for n, _ in named if patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns)}
        if not train:
            raise ValueError(
                f"round {round_}: DP-SGD's trainable patterns {list(patterns or ())} match no parameter of "
                f"the model (e.g. {named[0][0]!r})"
            )
        for name, p in named:
            p.requires_grad_(name in train)

    def _dp_sgd(
        self, fit: FitSettings, mu: float, steps: int, cases: int, round_: int | None
    ) -> DPSGD | None:
        """This round's DP-SGD (None when off); ValueError for what it cannot protect or a spent budget."""
        if fit.dp_sgd is None:
            return None
        sites = ", ".join(sorted({r.group for r in self.train_records}))
        where = f"site {sites}, round {round_}: DP-SGD"
        check_model(self.config.model)
        if mu > 0 or fit.scaffold or fit.feddyn_alpha > 0:
            raise ValueError(
                f"{where} clips per-case gradients of the task loss only: FedProx, SCAFFOLD and FedDyn are refused"
            )
        if self._parallel or self._use_amp:
            raise ValueError(f"{where} runs on one device without mixed precision")
        dp = DPSGD(fit.dp_sgd, list(self.dp_history), noise_key=self.dp_key)
        sample_rate = dp_sample_rate(self.config.batch_size, cases)
        dp.calibrate(steps, sample_rate, where)
        dp.check_budget(steps, sample_rate, where)
        return dp

    @torch.no_grad()
    def evaluate(
        self, weights: Mapping[str, torch.Tensor] | None = None, records: Sequence[CaseRecord] | None = None
    ) -> dict[str, float]:
        """Score ``weights`` (None = the trainer's current model) on this site's held-out cases.

        ``records`` scores other cases instead (e.g. a test split no setting was tuned on).

        The trainer's own model is not changed. Returns ``loss`` (mean per case), ``n_cases`` and
        dice_wt, dice_tc, dice_et, dice_mean (segmentation) or auc, accuracy (classification).
        """
        dataset = CaseDataset(
            self.val_records if records is None else list(records), self.config.task, augment=False
        )
        if len(dataset) == 0:
            raise ValueError("no held-out cases at this site (val_fraction = 0 or too few cases)")
        model = self.model
        if weights is not None:
            model = copy.deepcopy(self.model)
            self._load_into(model, weights, shared_only=True)
        net = self._wrapped(model)
        net.eval()
        loss_fn = self._loss_fn()
        loader = make_loader(
            dataset, self.config.batch_size, shuffle=False, num_workers=self.config.num_workers
        )
        dice = RegionDice() if self.config.task == "segmentation" else None
        all_logits: list[torch.Tensor] = []
        all_targets: list[torch.Tensor] = []
        loss_sum = 0.0
        for batch in loader:
            image = batch["image"].to(self.device)
            target = batch["label"].to(self.device)
            with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self._use_amp):
                logits = net(image)
            logits = logits.float()
            loss_sum += float(loss_fn(logits, target)) * image.shape[0]
            if dice is not None:
                dice.update(logits, target)
            else:
                all_logits.append(logits.cpu())
                all_targets.append(target.cpu())
        result = {"loss": loss_sum / len(dataset), "n_cases": float(len(dataset))}
        if dice is not None:
            result.update(dice.result())
        else:
            result.update(classification_metrics(torch.cat(all_logits), torch.cat(all_targets)))
        return result

    @property
    def val_keys(self) -> list[str]:
        """Case keys of the held-out split."""
        return [r.case_key for r in self.val_records]

    @property
    def train_keys(self) -> list[str]:
        """Case keys of the training split."""
        return [r.case_key for r in self.train_records]


class _IterateAverage:
    """Exponential moving average of the trainable weights over one round's optimiser steps.

    Started at the first step's weights: ``a_1 = w_1``, ``a_t = decay * a_{t-1} + (1 - decay) * w_t``;
    :meth:`apply` writes it into the parameters. Off (no-op) when ``decay`` is None.
    """

    def __init__(self, params: Sequence[nn.Parameter], decay: float | None) -> None:
        self.params, self.decay = list(params), decay
        self.average: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self) -> None:
        if self.decay is None:
            return
        if self.average is None:
            self.average = [p.detach().clone() for p in self.params]
            return
        for a, p in zip(self.average, self.params, strict=True):
            a.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def apply(self) -> None:
        if self.average is not None:
            for a, p in zip(self.average, self.params, strict=True):
                p.copy_(a)


class _DriftCorrection:
    """SCAFFOLD's control-variate correction and FedDyn's dynamic regulariser for one local round.

    SCAFFOLD corrects every gradient to ``g - c_i + c`` before the optimiser's step, and the new
    site control is the mean of the round's local gradients, ``c_i+ = (1/K) sum_k g_k`` (the
    paper's option II, ``c_i - c + (x - y) / (K lr)``, is that mean for plain SGD; with Adam the
    weight change is not ``lr`` times the gradient, so the mean is taken directly). FedDyn adds
    ``-<g_i, w> + alpha / 2 ||w - w_global||^2`` to the loss.
    """

    def __init__(
        self,
        trainer: LocalTrainer,
        global_weights: Mapping[str, torch.Tensor],
        fit: FitSettings,
        anchor: Mapping[str, torch.Tensor],
        lr: float,
    ) -> None:
        self.trainer, self.fit, self.anchor, self.lr = trainer, fit, anchor, lr
        self.params = trainer._controlled() if fit.scaffold or fit.feddyn_alpha > 0 else {}
        self.correction: dict[str, torch.Tensor] = {}
        self.gradient_sum: dict[str, torch.Tensor] = {}
        if fit.scaffold:
            _, server = split_controls(global_weights)
            for name, p in self.params.items():
                c = server[name].to(p.device, p.dtype) if name in server else torch.zeros_like(p)
                c_i = trainer.site_control.get(name)
                self.correction[name] = c if c_i is None else c - c_i.to(p.device)
        if fit.feddyn_alpha > 0:
            for name, p in self.params.items():
                trainer.dyn_gradient.setdefault(name, torch.zeros_like(p.detach()))

    def regularised(self, loss: torch.Tensor) -> torch.Tensor:
        alpha = self.fit.feddyn_alpha
        if alpha <= 0:
            return loss
        terms = [
            0.5 * alpha * torch.sum((p - self.anchor[n]) ** 2) - torch.sum(self.trainer.dyn_gradient[n] * p)
            for n, p in self.params.items()
        ]
        return loss + torch.stack(terms).sum() if terms else loss

    @torch.no_grad()
    def correct_gradients(self, scale: float = 1.0) -> None:
        """Record the gradients (scaled by ``scale`` under AMP) and add ``c - c_i`` to them."""
        for name, corr in self.correction.items():
            grad = self.params[name].grad
            if grad is None:
                continue
            total = self.gradient_sum.get(name)
            self.gradient_sum[name] = grad / scale if total is None else total.add_(grad, alpha=1.0 / scale)
            grad.add_(corr, alpha=scale)

    @torch.no_grad()
    def finish(self, steps: int) -> dict[str, torch.Tensor]:
        """Update the site state after ``steps`` steps; SCAFFOLD's control corrections (CPU) by name."""
        trainer, out = self.trainer, {}
        if self.fit.feddyn_alpha > 0:
            for name, p in self.params.items():
                trainer.dyn_gradient[name].sub_(p - self.anchor[name], alpha=self.fit.feddyn_alpha)
        if self.fit.scaffold and steps:
            for name, p in self.params.items():
                c_i = trainer.site_control.get(name)
                c_i = torch.zeros_like(p) if c_i is None else c_i.to(p.device)
                total = self.gradient_sum.get(name)
                new = torch.zeros_like(p) if total is None else total / steps
                trainer.site_control[name] = new
                out[name] = (new - c_i).detach().to("cpu", copy=True)
        return out
