"""Names and defaults that the trigger form, the experiment config and the heavy modules share.

Importable without torch: the central DAG file reads them while the scheduler parses it.
"""

from __future__ import annotations

#: How an update's tensors may be encoded on the wire.
ENCODINGS = ("fp32", "fp16", "int8")
#: The "site" id of the global model in manifests; reserved, no site may use it.
GLOBAL_SITE = "global"
#: Default cap on the training cases one site may claim per update.
DEFAULT_MAX_SITE_SAMPLES = 100_000
#: Default relative norm bound: clip an update above this many times the round's median norm.
DEFAULT_NORM_BOUND_FACTOR = 3.0
#: Server strategies by name; equal to the keys of ``jipfed.federation.strategies.STRATEGIES``
#: (a test keeps them equal).
STRATEGY_NAMES = (
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedbn",
    "feddyn",
    "fednova",
    "fedprox",
    "fedyogi",
    "median",
    "scaffold",
    "trimmed_mean",
)
