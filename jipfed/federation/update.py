"""The update exchange object: named tensors plus a validated, JSON-serialisable manifest.

Shaped after NVIDIA FLARE's DXO (one small frozen object: kind, tensors by name, meta), without its
layering. A :class:`ModelUpdate` is what a site sends (kind ``"delta"`` or ``"weights"``) and also
what the central publishes as the global model (kind ``"weights"``, site :data:`GLOBAL_SITE`).
On the wire it is a safetensors payload plus the manifest as JSON (see :mod:`jipfed.federation.codec`);
nothing here is ever pickled.

The manifest's tensor specs describe the *decoded* tensors (their dtype before any fp16 / int8
wire encoding). ``sha256`` is the hash of the encoded payload bytes: ``None`` until the update is
encoded.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Protocol

import torch

from jipfed.federation.names import ENCODINGS, GLOBAL_SITE  # noqa: F401 (re-exported)
from jipfed.storage.layout import validate_round, validate_slug

KINDS = ("weights", "delta")
#: Suffix of the per-tensor scale that int8 encoding adds to the payload; reserved in tensor names.
SCALE_SUFFIX = ".__scale__"
#: Prefix of control-variate tensors (SCAFFOLD): ``control/<weight name>`` travels beside the weight.
CONTROL_PREFIX = "control/"
#: State-dict entries that are buffers, not trainable weights (normalisation running statistics).
BUFFER_PATTERNS = ("*running_mean", "*running_var", "*num_batches_tracked")
MANIFEST_VERSION = 1

DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "float64": torch.float64,
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int64": torch.int64,
        "int32": torch.int32,
        "int16": torch.int16,
        "int8": torch.int8,
        "uint8": torch.uint8,
        "bool": torch.bool,
    }
)
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_NAME_CHARS = 1024


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest name of a torch dtype (``torch.float32`` -> ``"float32"``)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported tensor dtype {dtype}; supported: {sorted(DTYPES)}") from None


def validate_tensor_name(name: str) -> str:
    """Return ``name`` if it can name a tensor in an update, else raise ValueError naming it."""
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME_CHARS:
        raise ValueError(
            f"tensor name must be a non-empty string of at most {_MAX_NAME_CHARS} chars, got {name!r}"
        )
    if name.endswith(SCALE_SUFFIX):
        raise ValueError(f"tensor name {name!r} ends with the reserved suffix {SCALE_SUFFIX!r}")
    return name


def is_buffer(name: str, patterns: tuple[str, ...] = BUFFER_PATTERNS) -> bool:
    """True when ``name`` matches one of the (fnmatch) ``patterns`` of non-trainable buffers."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def is_control(name: str) -> bool:
    """True for a control-variate tensor name (``control/<weight name>``)."""
    return name.startswith(CONTROL_PREFIX)


def control_name(name: str) -> str:
    """The control-variate tensor name of weight ``name``."""
    return CONTROL_PREFIX + name


def split_controls(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(model tensors, control variates keyed by their weight's name)``."""
    model = {n: t for n, t in tensors.items() if not is_control(n)}
    controls = {n[len(CONTROL_PREFIX) :]: t for n, t in tensors.items() if is_control(n)}
    return model, controls


def control_specs(model: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """Specs of the control variates that may travel with ``model``: one per trainable float weight."""
    return {
        control_name(n): spec
        for n, spec in model.items()
        if spec.is_floating and not is_control(n) and not is_buffer(n)
    }


def validate_sha256(value: str, what: str) -> str:
    """Return ``value`` if it is 64 lower-case hex digits, else raise ValueError naming it."""
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ValueError(f"{what} must be 64 lower-case hex digits, got {value!r}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype (a :data:`DTYPES` key) of one named tensor."""

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        shape = self.shape
        if not isinstance(shape, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"shape must be a sequence of ints >= 0, got {shape!r}")
        object.__setattr__(self, "shape", tuple(shape))
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; supported: {sorted(DTYPES)}")

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        """The spec of ``tensor``."""
        return cls(shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_floating(self) -> bool:
        """True for float dtypes (averaged, encoded lossy); False for integer / bool buffers."""
        return self.torch_dtype.is_floating_point

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        if not isinstance(data, Mapping) or set(data) != {"shape", "dtype"}:
            raise ValueError(f"tensor spec must be an object with keys 'shape' and 'dtype', got {data!r}")
        if not isinstance(data["shape"], list):
            raise ValueError(f"tensor spec shape must be a list, got {data['shape']!r}")
        return cls(shape=tuple(data["shape"]), dtype=data["dtype"])


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """Specs of named tensors, in their order (tensor names validated)."""
    return {validate_tensor_name(name): TensorSpec.of(t) for name, t in tensors.items()}


def _frozen_specs(specs: Mapping[str, Any]) -> Mapping[str, TensorSpec]:
    if not isinstance(specs, Mapping) or not specs:
        raise ValueError(f"tensors must be a non-empty mapping of name -> TensorSpec, got {specs!r}")
    out: dict[str, TensorSpec] = {}
    for name, spec in specs.items():
        validate_tensor_name(name)
        if not isinstance(spec, TensorSpec):
            raise ValueError(f"spec of tensor {name!r} must be a TensorSpec, got {spec!r}")
        out[name] = spec
    return MappingProxyType(out)


def _frozen_metrics(metrics: Mapping[str, Any]) -> Mapping[str, float]:
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a mapping of name -> float, got {metrics!r}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metric names must be non-empty strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"metric {key!r} must be a finite number, got {value!r}")
        out[key] = float(value)
    return MappingProxyType(out)


def _frozen_privacy(privacy: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(privacy, Mapping):
        raise ValueError(f"privacy must be a mapping of name -> JSON scalar, got {privacy!r}")
    out: dict[str, Any] = {}
    for key, value in privacy.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"privacy keys must be non-empty strings, got {key!r}")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"privacy value {key!r} must be a JSON scalar, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"privacy value {key!r} must be finite, got {value!r}")
        out[key] = value
    return MappingProxyType(out)


@dataclass(frozen=True, kw_only=True)
class UpdateManifest:
    """What travels next to the payload, as JSON (:meth:`to_json` / :meth:`from_json`).

    Attributes:
        experiment: experiment slug.
        round: round number (>= 0) the update belongs to.
        site: site slug; :data:`GLOBAL_SITE` for the global model.
        kind: ``"weights"`` (full model) or ``"delta"`` (weights - global of this round).
        n_samples: training cases behind the update (the FedAvg weight); 0 only for a global model
            that aggregates nothing yet.
        tensors: name -> :class:`TensorSpec` of the decoded tensors, in model order.
        config_hash: sha256 (hex) of the experiment config the update was produced under.
        encoding: wire encoding of float tensors: ``"fp32"`` (as is, lossless), ``"fp16"``, ``"int8"``.
        sha256: hex sha256 of the encoded payload bytes; None before encoding.
        metrics: aggregate local numbers (loss, Dice, ...), finite floats.
        privacy: what privacy mechanisms spent (e.g. ``{"epsilon": 1.2, "delta": 1e-5}``).
        created_at: ISO-8601 timestamp, or None.
    """

    experiment: str
    round: int
    site: str
    kind: str
    n_samples: int
    tensors: Mapping[str, TensorSpec]
    config_hash: str
    encoding: str = "fp32"
    sha256: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    privacy: Mapping[str, Any] = field(default_factory=dict)
    created_at: str | None = None

    def __post_init__(self) -> None:
        validate_slug(self.experiment, "experiment")
        validate_round(self.round)
        validate_slug(self.site, "site")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < 0:
            raise ValueError(f"n_samples must be an int >= 0, got {self.n_samples!r}")
        validate_sha256(self.config_hash, "config_hash")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.encoding == "int8" and self.kind != "delta":
            raise ValueError(f"encoding 'int8' is for deltas only, got kind {self.kind!r}")
        if self.sha256 is not None:
            validate_sha256(self.sha256, "sha256")
        if self.created_at is not None:
            try:
                datetime.fromisoformat(self.created_at)
            except (TypeError, ValueError):
                raise ValueError(f"created_at must be an ISO-8601 string, got {self.created_at!r}") from None
        object.__setattr__(self, "tensors", _frozen_specs(self.tensors))
        object.__setattr__(self, "metrics", _frozen_metrics(self.metrics))
        object.__setattr__(self, "privacy", _frozen_privacy(self.privacy))

    def replace(self, **changes: Any) -> UpdateManifest:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "experiment": self.experiment,
            "round": self.round,
            "site": self.site,
            "kind": self.kind,
            "n_samples": self.n_samples,
            "tensors": [{"name": name, **spec.to_dict()} for name, spec in self.tensors.items()],
            "config_hash": self.config_hash,
            "encoding": self.encoding,
            "sha256": self.sha256,
            "metrics": dict(self.metrics),
            "privacy": dict(self.privacy),
            "created_at": self.created_at,
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no NaN); ``tensors`` is a list in model order."""
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UpdateManifest:
        """Inverse of :meth:`to_dict`; ValueError on unknown / missing keys or bad values."""
        if not isinstance(data, Mapping):
            raise ValueError(f"manifest must be a JSON object, got {type(data).__name__}")
        required = {"version", "experiment", "round", "site", "kind", "n_samples", "tensors", "config_hash"}
        allowed = required | {"encoding", "sha256", "metrics", "privacy", "created_at"}
        missing, unknown = required - set(data), set(data) - allowed
        if missing or unknown:
            raise ValueError(f"manifest keys: missing {sorted(missing)}, unknown {sorted(unknown)}")
        if data["version"] != MANIFEST_VERSION:
            raise ValueError(f"manifest version must be {MANIFEST_VERSION}, got {data['version']!r}")
        entries = data["tensors"]
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) and "name" in e for e in entries):
            raise ValueError(
                f"manifest tensors must be a list of {{name, shape, dtype}} objects, got {entries!r}"
            )
        tensors: dict[str, TensorSpec] = {}
        for entry in entries:
            name = entry["name"]
            if not isinstance(name, str) or name in tensors:
                raise ValueError(
                    f"manifest tensor names must be unique strings, got {name!r} twice or not a string"
                )
            tensors[name] = TensorSpec.from_dict({k: v for k, v in entry.items() if k != "name"})
        return cls(
            experiment=data["experiment"],
            round=data["round"],
            site=data["site"],
            kind=data["kind"],
            n_samples=data["n_samples"],
            tensors=tensors,
            config_hash=data["config_hash"],
            encoding=data.get("encoding", "fp32"),
            sha256=data.get("sha256"),
            metrics=data.get("metrics") or {},
            privacy=data.get("privacy") or {},
            created_at=data.get("created_at"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> UpdateManifest:
        """Parse :meth:`to_json` output; ValueError when it is not valid JSON or not a manifest."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"manifest is not valid JSON: {exc}") from None
        return cls.from_dict(data)


class UpdateSource(Protocol):
    """What strategies aggregate: a manifest plus tensors by name, eager or loaded on access.

    :class:`ModelUpdate` keeps its tensors in memory; :class:`jipfed.federation.codec.LazyUpdate`
    loads one tensor per ``tensors[name]`` from a validated file.
    """

    @property
    def manifest(self) -> UpdateManifest: ...

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]: ...


class ManifestFields:
    """``kind``, ``site``, ``round`` and ``n_samples`` read from ``self.manifest``."""

    manifest: UpdateManifest

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def site(self) -> str:
        return self.manifest.site

    @property
    def round(self) -> int:
        return self.manifest.round

    @property
    def n_samples(self) -> int:
        return self.manifest.n_samples


@dataclass(frozen=True, eq=False)
class ModelUpdate(ManifestFields):
    """Named CPU tensors and their manifest; built through :meth:`build` or the codec.

    Validated when built: tensor names, shapes and dtypes equal the manifest's specs. Values
    (finiteness, norm) are checked by :mod:`jipfed.federation.validation` on the receiving side.
    The tensors are not copied: do not modify them after building.
    """

    tensors: Mapping[str, torch.Tensor]
    manifest: UpdateManifest

    def __post_init__(self) -> None:
        if not isinstance(self.manifest, UpdateManifest):
            raise ValueError(f"manifest must be an UpdateManifest, got {type(self.manifest).__name__}")
        if not isinstance(self.tensors, Mapping):
            raise ValueError(
                f"tensors must be a mapping of name -> Tensor, got {type(self.tensors).__name__}"
            )
        specs = self.manifest.tensors
        if list(self.tensors) != list(specs):
            missing = [n for n in specs if n not in self.tensors]
            extra = [n for n in self.tensors if n not in specs]
            raise ValueError(
                f"tensors do not match the manifest: missing {missing}, extra {extra} (or different order)"
            )
        for name, tensor in self.tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"tensor {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.device.type != "cpu":
                raise ValueError(f"tensor {name!r} must be on the CPU, got device {tensor.device}")
            if TensorSpec.of(tensor) != specs[name]:
                raise ValueError(f"tensor {name!r} is {TensorSpec.of(tensor)}, manifest says {specs[name]}")
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    @classmethod
    def build(
        cls,
        tensors: Mapping[str, torch.Tensor],
        *,
        experiment: str,
        round: int,
        site: str,
        kind: str,
        n_samples: int,
        config_hash: str,
        metrics: Mapping[str, float] | None = None,
        privacy: Mapping[str, Any] | None = None,
        created_at: str | None = None,
    ) -> ModelUpdate:
        """An unencoded update (``sha256`` None, ``encoding`` fp32) with specs taken from ``tensors``."""
        manifest = UpdateManifest(
            experiment=experiment,
            round=round,
            site=site,
            kind=kind,
            n_samples=n_samples,
            tensors=spec_of(tensors),
            config_hash=config_hash,
            metrics=metrics or {},
            privacy=privacy or {},
            created_at=created_at,
        )
        return cls(tensors=tensors, manifest=manifest)
