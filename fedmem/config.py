"""The one configuration tree: frozen dataclasses loaded from TOML, overridden by dotted keys.

A scenario is a TOML file in ``simulations/``; every key is optional and falls
back to the defaults below (``simulations/default.toml`` spells them out and a
test keeps the two equal). ``--set section.key=value`` overrides any key.

The config block below is its own reference: each key's range and choices are declared on
its field with :func:`setting` (``lr: float = setting(0.01, "(0, inf)")``), and every number
must be finite and >= 0 unless its field declares more. Validation happens here, before
anything starts: an unknown key, a wrong type, a value outside its field's declaration or an
unknown name (data set, partition scheme, model, index) raises
:class:`~fedmem.errors.ConfigError` with one sentence naming the key and the valid choices or
range; :func:`validate` then checks only the rules that link several keys.

Strategy-specific hyperparameters live in a sub-table named after the strategy
(``[strategy.fedprox] mu = 0.01``). This module keeps those tables as given;
each strategy parses its own into its ``Params`` dataclass, declared the same way, and the
names are checked where the strategies' registry is loaded (``strategies.check_config``),
so this module never imports ``strategies``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import tomli_w

from fedmem.errors import ConfigError

SIMULATIONS_DIR = Path(__file__).resolve().parent.parent / "simulations"

T = TypeVar("T")

# --------------------------------------------------------------------------- declarations

_NUMBER = r"[-+]?(?:inf|\d*\.?\d+(?:e[-+]?\d+)?)"
_INTERVAL = re.compile(
    rf"(?:(?P<also>{_NUMBER}) or )?"
    rf"(?P<left>[\[(])\s*(?P<low>{_NUMBER})\s*,\s*(?P<high>{_NUMBER})\s*(?P<right>[\])])"
)


@dataclass(frozen=True)
class Interval:
    """A numeric range written as in mathematics: ``"[0, 1)"``, ``"(0, inf)"``, ``"0 or [4, inf)"``."""

    left: str  # "[" or "("
    low: str  # the bounds as written, for messages
    high: str
    right: str  # "]" or ")"
    also: str | None = None  # "0 or [4, inf)": one more valid value (0 = off)

    @classmethod
    def parse(cls, text: str) -> Interval:
        match = _INTERVAL.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"interval {text!r} is not written like '[0, 1)' or '(0, inf)'")
        return cls(**match.groupdict())

    def __contains__(self, value: float) -> bool:
        # written so that NaN is outside every interval
        above = value > float(self.low) if self.left == "(" else value >= float(self.low)
        below = value < float(self.high) if self.right == ")" else value <= float(self.high)
        return (above and below) or (self.also is not None and value == float(self.also))

    @property
    def shown(self) -> str:
        """The range in a message: ``> 0``, ``>= 1``, ``in [0, 1)``, ``0 or at least 4``."""
        if self.also is not None and (self.left, self.high) == ("[", "inf"):
            return f"{self.also} or at least {self.low}"
        if self.high == "inf":
            part = f"{'>=' if self.left == '[' else '>'} {self.low}"
        else:
            part = f"in {self.left}{self.low}, {self.high}{self.right}"
        return f"{self.also} or {part}" if self.also is not None else part


_AT_LEAST_ZERO = Interval.parse("[0, inf)")  # every number without a declared interval

# Choices that live in a lower layer (data, models, memory, training, updates), resolved when a
# config is checked by :func:`_lower_choices`, so that importing this module imports none of them.
LowerChoices = Literal["DATASETS", "SCHEMES", "MODELS", "INDEXES", "TASKS", "GRADIENTS", "AGGREGATES"]
Lookup = Callable[[str], object]  # a registry's get: returns the entry or raises naming the choices


def _lower_choices(name: LowerChoices) -> tuple[str, ...] | Lookup:
    from fedmem.data.datasets import DATASETS
    from fedmem.data.partition import SCHEMES
    from fedmem.data.tasks import TASKS
    from fedmem.memory.datastore import INDEXES
    from fedmem.models import MODELS
    from fedmem.training import GRADIENTS
    from fedmem.updates import AGGREGATES

    known: dict[str, tuple[str, ...] | Lookup] = {
        "DATASETS": DATASETS.get,
        "SCHEMES": SCHEMES.get,
        "MODELS": MODELS.get,
        "INDEXES": INDEXES.get,
        "TASKS": TASKS,
        "GRADIENTS": GRADIENTS,
        "AGGREGATES": AGGREGATES,
    }
    return known[name]


@dataclass(frozen=True)
class Declaration:
    """What a field declares about its values; :func:`build_dataclass` checks it (see :func:`setting`)."""

    interval: Interval | None = None  # None: the default [0, inf)
    choices: tuple[str, ...] | LowerChoices | None = None
    nonempty: bool = False  # lists: at least one element
    distinct: bool = False  # lists: no element twice
    hint: str = ""  # said after the range in a refusal: "(0 = off)"
    message: str = ""  # a refusal worded otherwise: a template of {key}, {value}, {range}, {valid}
    check: Callable[[Any, str], None] | None = None  # (value, key): raises ConfigError naming the key

    @property
    def range(self) -> Interval:
        return self.interval or _AT_LEAST_ZERO


_DECLARED = "declared"  # the field metadata key of a Declaration


def within(
    interval: str | None = None,
    *,
    choices: tuple[str, ...] | LowerChoices | None = None,
    nonempty: bool = False,
    distinct: bool = False,
    hint: str = "",
    message: str = "",
    check: Callable[[Any, str], None] | None = None,
) -> dict[str, Any]:
    """Field metadata declaring a field's valid values (:func:`setting` is the short form).

    ``interval`` is written as in mathematics, ``"[0, 1)"``, ``"(0, inf)"`` or ``"0 or [4, inf)"``,
    and bounds a number or every number in a list; ``choices`` are the valid strings (or the name
    of a lower layer's registry, resolved when a config is checked); ``nonempty`` and ``distinct``
    constrain lists; ``check(value, key)`` is a test that no range can say. The refusal is one
    generated sentence naming the key and the range or the choices, followed by ``hint``, or
    ``message`` with ``{key}``, ``{value}``, ``{range}`` and ``{valid}`` (the choices) filled in.
    """
    bounds = None if interval is None else Interval.parse(interval)
    return {_DECLARED: Declaration(bounds, choices, nonempty, distinct, hint, message, check)}


def setting(default: T, interval: str | None = None, **declared: Any) -> T:
    """A dataclass field with ``default`` and a declaration of its valid values (keywords: :func:`within`)."""
    return field(default=default, metadata=within(interval, **declared))


def declaration(f: dataclasses.Field[Any]) -> Declaration:
    """What field ``f`` declares (an empty declaration, the default [0, inf) for numbers, if nothing)."""
    found = f.metadata.get(_DECLARED, Declaration())
    assert isinstance(found, Declaration)
    return found


# Single-key tests that no range or choice list can say.


def _plain_name(name: str, key: str) -> None:
    _check(
        re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) is not None,
        f"{key} = {name!r} must be a plain name (letters, digits, '.', '_', '-'; not a path): "
        "it names the run directory inside the output directory",
    )


# A host name, an IPv4 address or a bracketed IPv6 address, then a port.
_HOST_PORT = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")


def check_ray_address(address: str, key: str) -> None:
    """Refuse a Ray address fedmem cannot join, naming ``key`` (a config key or an environment variable).

    Valid: ``""`` (fedmem starts its own Ray), ``"auto"`` (the cluster this machine is a node
    of) or ``"HOST:PORT"`` (the head node's GCS address). Ray Client addresses (``ray://``)
    are refused: Flower's actors need a driver that is part of the cluster.
    """
    match = _HOST_PORT.fullmatch(address)
    _check(
        address in ("", "auto") or (match is not None and 1 <= int(match.group(1)) <= 65535),
        f"{key} = {address!r} is not a Ray address fedmem can join; valid forms: '' (start a local Ray), "
        "'auto' (the cluster this machine is a node of) or 'HOST:PORT' (the head node's address, "
        "e.g. 10.0.0.5:6379)",
    )


def _canary_format(template: str, key: str) -> None:
    from fedmem.probes._validate import ProbeInputError
    from fedmem.probes.canaries import CanaryFormat

    try:
        CanaryFormat(template)
    except ProbeInputError as exc:
        raise ConfigError(f"{key}: {exc}") from None


# --------------------------------------------------------------------------- the tree

LOSSES = ("ce", "rll", "gce")  # strategy.loss: the functions are in fedmem.losses
WEIGHTINGS = ("examples", "uniform")
ACCOUNTANTS = ("rdp", "pld")
CLIPPINGS = ("fixed", "adaptive")
AUDIT_ROLES = ("", "target", "shadow", "subsample")
ENGINES = ("flower", "inprocess")
# strategy.gradient and update.aggregate are refused as fedmem.training and fedmem.updates word it
_UNQUOTED = "{key} = {value!r} is not known; valid choices: {valid}"


@dataclass(frozen=True)
class DataConfig:
    """Which data set to load and from where."""

    dataset: str = setting("fashion_mnist", choices="DATASETS")
    root: str = "data"  # searched first; torchvision downloads here when nothing is found
    max_samples: int = setting(0, hint="(0 = all)")  # otherwise a seeded random subset (quick runs, tests)
    download: bool = True
    seq_len: int = setting(80, "[2, inf)", hint="characters")  # text data sets: characters per window
    # "" | permuted | permuted_marked: each client's own task (fedmem.data.tasks)
    tasks: str = setting("", choices="TASKS")
    # permuted_marked: pixels per side of one bit of the client's corner marker
    marker_cell: int = setting(2, "[1, inf)", hint="pixel")
    # fraction of each noisy client's train labels flipped to another class (fedmem.data.noise)
    label_noise: float = setting(0.0, "[0, 1]", hint="(0 = off)")
    # partition ids whose train labels flip, each below partition.num_clients; () = every seen client
    noisy_clients: tuple[int, ...] = setting(
        (),
        distinct=True,
        message="{key} must list distinct partition ids {range} (or be [] for every seen client), "
        "got {value}",
    )


@dataclass(frozen=True)
class PartitionConfig:
    """How the pooled data set is split into clients, and each client into train/val/test."""

    scheme: str = setting("dirichlet", choices="SCHEMES")
    num_clients: int = setting(20, "[1, inf)")
    alpha: float = setting(0.3, "(0, inf)")  # dirichlet concentration: smaller = more label skew
    classes_per_client: int = setting(2, "[1, inf)", hint="(pathological scheme)")
    min_size: int = 10
    train_fraction: float = setting(0.7, "(0, 1)")  # train + val < 1
    val_fraction: float = setting(0.15, "(0, 1)")  # test gets the rest
    unseen_fraction: float = setting(0.2, "[0, 1)")  # clients held out of training, evaluated after it


@dataclass(frozen=True)
class ModelConfig:
    """The backbone: ``features(x) -> embedding`` and ``head(z) -> logits``."""

    name: str = setting("cnn", choices="MODELS")
    embedding_dim: int = setting(64, "[1, inf)")


@dataclass(frozen=True)
class NoParams:
    """A strategy without hyperparameters of its own."""


@dataclass(frozen=True)
class StrategyConfig:
    """The training strategy, client sampling and the local optimizer (SGD with momentum).

    ``params`` holds the strategy's own hyperparameters, from ``[strategy.<name>]``.
    """

    name: str = "fedavg"  # a registered strategy (checked by strategies.check_config)
    fraction_fit: float = setting(1.0, "(0, 1]")  # fraction of seen clients sampled each round
    lr: float = setting(0.01, "(0, inf)")
    momentum: float = setting(0.9, "[0, 1)")
    weight_decay: float = 0.0
    local_epochs: int = setting(1, "[1, inf)")
    # > 0 replaces local_epochs by a fixed number of mini-batch steps
    local_steps: int = setting(0, hint="(0 = use local_epochs)")
    batch_size: int = setting(32, "[1, inf)")
    loss: str = setting("ce", choices=LOSSES)  # the loss of every local training step (fedmem.losses)
    loss_alpha: float = setting(
        0.1, "(0, inf)", message="{key} (the robust log loss's alpha) must be {range}, got {value}"
    )
    loss_q: float = setting(
        0.7, "(0, 1]", message="{key} (the generalized cross-entropy's q) must be {range}, got {value}"
    )
    # the gradient of each local step (coherent gradients): mean | winsorized | median3 | dpsgd
    gradient: str = setting("mean", choices="GRADIENTS", message=_UNQUOTED)
    # winsorized: values clipped at each end of every coordinate, per batch (< strategy.batch_size / 2)
    winsor_c: int = 1
    # dpsgd (sample-level DP-SGD, Abadi et al. 2016): per-example L2 clip norm C and noise multiplier z
    dp_clip: float = setting(1.0, "(0, inf)", hint="(the L2 bound of each example's gradient)")
    dp_noise: float = setting(1.0, hint="(the noise std over strategy.dp_clip; 0 = no noise)")
    # [strategy.<name>] tables as given, for the strategy and the personalizers; each parses its own
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class FinetuneConfig:
    """Local fine-tuning of the trained model on each client's train split (FedAvg+FT)."""

    epochs: int = 1
    lr: float = setting(0.01, "(0, inf)")
    momentum: float = setting(0.9, "[0, 1)")
    batch_size: int = setting(32, "[1, inf)")


@dataclass(frozen=True)
class MemoryConfig:
    """kNN-Per's per-client memory (Marfoq et al., ICML 2022)."""

    index: str = setting("flat", choices="INDEXES")  # flat (exact), ivf, hnsw
    capacity: int = setting(0, hint="(0 = unlimited)")  # examples stored; 0 = the whole train split
    k_grid: tuple[int, ...] = setting((5, 10, 20), "[1, inf)", nonempty=True)
    lambda_grid: tuple[float, ...] = setting(
        (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), "[0, 1]", nonempty=True
    )
    # kernel exp(-d / T) on squared L2 distances; 0 = T = model.embedding_dim
    temperature: float = setting(0.0, hint="(0 = model.embedding_dim)")
    nprobe: int = setting(8, "[1, inf)")  # ivf only
    hnsw_m: int = setting(32, "[1, inf)")  # hnsw only
    ef_search: int = setting(64, "[1, inf)")  # hnsw only
    mix_logits: bool = False  # compatibility: mix p_kNN with raw logits like the reference code
    # private memory (fedmem.memory.datastore): drop stored exact copies of a query when searching;
    # Gaussian noise of this std on every stored embedding (0 = none)
    exclude_self: bool = False
    embedding_noise: float = setting(
        0.0, message="{key} must be a standard deviation {range} (0 = no noise), got {value}"
    )


@dataclass(frozen=True)
class EvalConfig:
    """Personalized evaluation of every client on its own test split."""

    personalizers: tuple[str, ...] = ("finetune", "knnper")  # strategies whose personalize hook is applied
    batch_size: int = setting(256, "[1, inf)")  # inference batches; larger ones were slower on CPU (cache)
    # also report predictors that adapt by local steps (finetune, perfedavg) after each of these
    # step counts, as "<label>@<k>": an adaptation curve from one federation
    adapt_steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class UpdateConfig:
    """Post-processing of client updates that composes with any strategy (client-level DP's mechanics).

    With ``clip_norm > 0`` each client scales its update (what it uploads minus what it received,
    jointly over every array it sends back under a received name) to an L2 norm of at most
    ``clip_norm``; with ``noise_multiplier > 0`` (client-level DP, McMahan et al., ICLR 2018) the
    strategy aggregates only the mean of the clipped updates over the clients *sampled* plus Gaussian
    noise of standard deviation ``noise_multiplier * clip_norm / sampled``, and the run reports
    epsilon at ``delta`` (``fedmem.privacy``, ``docs/privacy.md``).
    ``aggregate`` chooses how the server combines the uploads: the example-weighted mean, or the
    unweighted coordinate-wise median or trimmed mean of Yin et al. (ICML 2018), which cut the
    directions few clients agree on.
    """

    # the L2 bound of each client's update; the initial one with clipping = "adaptive"
    clip_norm: float = setting(0.0, hint="(0 = no clipping)")
    noise_multiplier: float = 0.0  # 0 = no noise; needs clip_norm > 0 and weighting = "uniform"
    # how the server weights clients: "examples" (FedAvg) or "uniform" (client-level DP needs it)
    weighting: str = setting("examples", choices=WEIGHTINGS)
    delta: float = setting(1e-5, "(0, 1)")  # epsilon is reported at this delta; < 1 / (training clients)
    accountant: str = setting("rdp", choices=ACCOUNTANTS)  # rdp (any fraction_fit) or pld (fraction_fit = 1)
    # fixed | adaptive (Andrew et al. 2021: C tracks a quantile of update norms)
    clipping: str = setting("fixed", choices=CLIPPINGS)
    # adaptive: gamma, the fraction of updates meant to stay unclipped
    target_quantile: float = setting(0.5, "[0, 1]")
    clip_lr: float = 0.2  # adaptive: eta_C of the geometric update C <- C exp(-eta_C (b - gamma))
    count_noise_std: float = 0.0  # adaptive: sigma_b, noise std on the count of unclipped clients
    aggregate: str = setting("mean", choices="AGGREGATES", message=_UNQUOTED)  # mean | median | trimmed_mean
    # trimmed_mean: fraction of clients cut at each end, per coordinate
    trim_fraction: float = setting(0.1, "[0, 0.5)", hint="(the fraction of clients cut at each end)")


@dataclass(frozen=True)
class AuditConfig:
    """The leakage audit (``fedmem audit``): shadow federations, image canaries, subsampled federations.

    ``role`` and ``index`` say which federation of an audit this config describes; ``fedmem audit``
    sets them, so each federation's ``config.toml`` reproduces it with ``fedmem run``. With the
    default ``role = ""`` a run is a plain federation and nothing here changes it.
    """

    # LiRA shadow federations (each train example IN with probability 1/2); 0 = off
    shadows: int = setting(
        16, "0 or [4, inf)", hint="(LiRA fits each shadow's IN and OUT Gaussians on the others)"
    )
    # seen clients that insert canaries into their train split; 0 = off
    canary_clients: int = setting(2, hint="(0 = no canaries)")
    # how many times each canary is repeated
    repetitions: tuple[int, ...] = setting((1, 4, 16), "[1, inf)", nonempty=True, distinct=True)
    canaries_per_repetition: int = setting(4, "[1, inf)")  # distinct canaries per client and repetition count
    references: int = setting(1000, "[1, inf)")  # never-inserted candidates that canaries are ranked against
    # federations on a random half of the seen clients; 0 = off
    subsamples: int = setting(32, "0 or [2, inf)", hint="(each client must be in and out)")
    # text data sets: each {} is one digit
    canary_format: str = setting("the random number is {}{}{}{}{}{}", check=_canary_format)
    # "" plain run | target | shadow | subsample (set by fedmem audit)
    role: str = setting("", choices=AUDIT_ROLES)
    index: int = 0  # which shadow or subsampled federation (role shadow / subsample): below their number


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the simulation runs."""

    # flower (Ray simulation engine) or inprocess (the same hooks in one process)
    engine: str = setting("flower", choices=ENGINES)
    cpus_per_client: int = setting(1, "[1, inf)")
    num_cpus: int = setting(0, hint="(0 = all)")  # CPUs given to Ray: 0 = all of this machine's
    output_dir: str = "runs"
    max_failure_fraction: float = setting(0.5, "[0, 1)")  # stop when more clients than this fail in one round
    # seconds to wait for one round's replies (flower engine)
    round_timeout: float = setting(0.0, hint="(0 = no limit)")
    run_dir: str = ""  # set by the runner; clients keep per-client files under it
    # rounds between checkpoints (fedmem resume RUN_DIR)
    checkpoint_every: int = setting(1, hint="(0 = no checkpoints)")
    # "" = start a local Ray (or join RAY_ADDRESS if set); "auto" or "HOST:PORT" = join that cluster
    ray_address: str = setting("", check=check_ray_address)


@dataclass(frozen=True)
class Config:
    """A whole scenario."""

    name: str = setting("default", check=_plain_name)  # names the run directory
    seed: int = 0
    rounds: int = setting(10, hint="(0 = evaluate the initial model)")
    # evaluate all clients every this many rounds, and always after the last
    eval_every: int = setting(5, "[1, inf)")
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def replace(self, **changes: Any) -> Config:
        """A copy with top-level fields changed."""
        return dataclasses.replace(self, **changes)

    def with_runtime(self, **changes: Any) -> Config:
        """A copy with ``runtime`` fields changed."""
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **changes))

    @property
    def kernel_temperature(self) -> float:
        """kNN-Per's kernel temperature: ``memory.temperature``, or the embedding size when it is 0."""
        return self.memory.temperature or float(self.model.embedding_dim)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict; strategy params become ``[strategy.<name>]`` sub-tables."""
        out = dataclasses.asdict(self)
        out["strategy"].update(out["strategy"].pop("params"))
        return _lists(out)

    def to_toml(self) -> str:
        """The resolved scenario as TOML: ``fedmem run`` on it reproduces the run."""
        return tomli_w.dumps(self.to_dict())

    def to_json(self) -> str:
        """Compact JSON, used to ship the config inside Flower messages."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any], skip: Sequence[str] = ()) -> str | None:
    """The first dotted key whose value differs between two config dicts (``to_dict``), or None.

    Keys equal to or under an entry of ``skip`` (``"runtime"``, ``"data.root"``) are not compared.
    """

    def flat(node: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(node, Mapping):
            return {prefix: node}
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out

    fa, fb = flat(a, ""), flat(b, "")
    for key in sorted(set(fa) | set(fb)):
        if any(key == s or key.startswith(s + ".") for s in skip):
            continue
        if fa.get(key, "<absent>") != fb.get(key, "<absent>"):
            return f"{key} ({fa.get(key, '<absent>')!r} there, {fb.get(key, '<absent>')!r} here)"
    return None


def _lists(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_lists(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    if get_origin(tp) is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (TOML types), converting int -> float."""
    origin = get_origin(tp)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if isinstance(value, str) and "\x00" in value:
        # strings name files, directories and choices; the OS refuses NUL in a path with a ValueError
        raise ConfigError(f"{key} must not contain a NUL character, got {value!r}")
    # TOML integers are 64-bit; Python's parser reads longer ones, which no float or seed can hold
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{key} must be between -2**63 and 2**63 - 1 (a TOML integer), got {value}")
    return float(value) if tp is float else value


def build_dataclass(cls: type[Any], table: Mapping[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys, wrong types and bad values.

    Every field is checked against its declaration (:func:`setting`, :func:`within`): every number
    (and number in a list) must be finite and in the field's interval, ``[0, inf)`` unless it
    declares one, and a string one of its choices. A dataclass whose keys constrain each other
    (say, ``a < b``) defines one more hook, ``check(self, prefix: str) -> None``, which is called
    after every field passed its own declaration and raises ``ConfigError`` naming the keys
    (``f"{prefix}a"``).

    Parameters
    ----------
    cls:
        A frozen dataclass whose fields are bool, int, float, str, tuples of those,
        or nested dataclasses.
    table:
        The parsed TOML table.
    prefix:
        Dotted path of the table, for error messages ("" at the top).
    """
    built = _build(cls, table, prefix)
    _check_declared(built, prefix)
    check = getattr(built, "check", None)
    if check is not None:
        check(prefix)
    return built


def _build(cls: type[Any], table: Mapping[str, Any], prefix: str) -> Any:
    """:func:`build_dataclass` without the declarations' checks (``validate`` runs them on the whole tree)."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            valid = f"valid keys here: {', '.join(names)}" if names else f"{prefix.rstrip('.')} takes no keys"
            raise ConfigError(f"unknown config key {dotted!r}; {valid}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} must be a table of keys ({', '.join(_field_names(tp))})")
            kwargs[key] = _build(tp, value, f"{dotted}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _check_declared(node: Any, prefix: str) -> None:
    """Check each field of a built dataclass, and of the ones nested in it, against its declaration."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_declared(value, f"{key}.")
        elif isinstance(value, Mapping):
            # strategy.params: the [strategy.<name>] tables, whose keys are written without "params";
            # each strategy checks its own table's declarations when it parses it (build_dataclass)
            _check_finite(value, prefix.rstrip("."))
        else:
            _check_finite(value, key)
            _check_value(declaration(f), value, key)


def _check_finite(node: Any, key: str, *, element: bool = False) -> None:
    """Refuse NaN and infinity in a value, a list or a table (strategy tables too), naming the key.

    Range checks compare with ``>`` and ``<``, which NaN passes and infinity often does: an
    infinite learning rate would otherwise fail only after the first round of training.
    """
    if isinstance(node, float):
        what = "hold finite numbers" if element else "be a finite number"
        _check(math.isfinite(node), f"{key} must {what}, got {node}")
    elif isinstance(node, Mapping):
        for k, v in node.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(node, list | tuple):
        for v in node:
            _check_finite(v, key, element=True)


def _check_value(d: Declaration, value: Any, key: str) -> None:
    """Refuse ``value`` (a finite scalar or a tuple of them) unless it is what ``d`` declares."""
    many = isinstance(value, tuple)
    shown = list(value) if many else value
    if many and ((d.nonempty and not value) or (d.distinct and len(set(value)) != len(value))):
        raise ConfigError(_out_of_range(d, key, shown, many))
    for v in value if many else (value,):
        if isinstance(v, int | float) and not isinstance(v, bool) and v not in d.range:
            raise ConfigError(_out_of_range(d, key, shown, many))
        if isinstance(v, str) and d.choices is not None:
            _check_choice(d, v, key)
    if d.check is not None:
        d.check(value, key)


def _out_of_range(d: Declaration, key: str, shown: Any, many: bool) -> str:
    """One sentence naming ``key`` and its declared range (for a number or a list of numbers)."""
    if d.message:
        return d.message.format(key=key, value=shown, range=d.range.shown, valid="")
    what = f"{d.range.shown} {d.hint}" if d.hint else d.range.shown
    if not many:
        return f"{key} must be {what}, got {shown}"
    if d.nonempty or d.distinct:
        kind = f"{'non-empty ' if d.nonempty else ''}list of {'distinct ' if d.distinct else ''}values"
        return f"{key} must be a {kind} {what}, got {shown}"
    return f"{key} must hold values {what}, got {shown}"


def _check_choice(d: Declaration, value: str, key: str) -> None:
    """One sentence naming ``key`` and the valid choices unless ``value`` is one of them."""
    assert d.choices is not None
    choices = _lower_choices(d.choices) if isinstance(d.choices, str) else d.choices
    if callable(choices):
        choices(value)  # a registry's get: its own sentence names the key and the valid choices
    elif value not in choices:
        if d.message:
            raise ConfigError(d.message.format(key=key, value=value, range="", valid=", ".join(choices)))
        valid = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{key} = {value!r} is not known; valid choices: {valid}")


def _field_names(cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict (parsed TOML plus overrides)."""
    raw = dict(raw)
    strategy_table = raw.pop("strategy", {})
    if not isinstance(strategy_table, Mapping):
        raise ConfigError(f"strategy must be a table of keys ({', '.join(_field_names(StrategyConfig))})")
    strategy = dict(strategy_table)
    sub_tables = {k: v for k, v in strategy.items() if isinstance(v, Mapping)}
    for k in sub_tables:
        del strategy[k]
    if "params" in strategy:
        raise ConfigError("strategy.params is not a key; strategy parameters go in [strategy.<name>] tables")
    cfg: Config = _build(Config, raw, "")
    strat: StrategyConfig = _build(StrategyConfig, {k: v for k, v in strategy.items()}, "strategy.")
    params = {k: _deep_copy(v) for k, v in sorted(sub_tables.items())}
    cfg = dataclasses.replace(cfg, strategy=dataclasses.replace(strat, params=params))
    validate(cfg)
    return cfg


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# --------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Check every key against its field's declaration, then the rules that link several keys.

    Raises :class:`ConfigError` with one sentence naming the key and the valid choices or range.
    """
    _check_declared(cfg, "")
    _tasks_fit_the_data(cfg)
    _label_noise_fits_the_data(cfg)
    _splits_leave_a_test_split(cfg)
    _winsor_c_leaves_gradients_unclipped(cfg)
    _client_level_dp_is_sound(cfg)
    _audit_index_names_a_federation(cfg)
    _clients_fit_the_cpus(cfg)


def _is_text(dataset: str) -> bool:
    from fedmem.data.datasets import DATASETS
    from fedmem.data.text import SnapshotSource

    return isinstance(DATASETS.get(dataset), SnapshotSource)


def _tasks_fit_the_data(cfg: Config) -> None:
    """``data.tasks`` relabels and marks images, in a marker of so many bits (``partition.num_clients``)."""
    from fedmem.data.tasks import MAX_MARKED_CLIENTS

    d = cfg.data
    if not d.tasks:
        return
    _check(
        not _is_text(d.dataset),
        f"data.tasks = {d.tasks!r} relabels classes and marks images, but {d.dataset!r} is text; "
        "use an image data set or data.tasks = ''.",
    )
    _check(
        d.tasks != "permuted_marked" or cfg.partition.num_clients <= MAX_MARKED_CLIENTS,
        f"data.tasks = 'permuted_marked' writes client ids in a {MAX_MARKED_CLIENTS.bit_length() - 1}-bit "
        f"marker, so partition.num_clients must be <= {MAX_MARKED_CLIENTS}, got {cfg.partition.num_clients}",
    )


def _label_noise_fits_the_data(cfg: Config) -> None:
    """``data.noisy_clients`` are partition ids, and ``data.label_noise`` flips class labels (not text)."""
    d, n = cfg.data, cfg.partition.num_clients
    _check(
        all(c < n for c in d.noisy_clients),
        f"data.noisy_clients must list distinct partition ids in [0, partition.num_clients) = [0, {n}) "
        f"(or be [] for every seen client), got {list(d.noisy_clients)}",
    )
    _check(
        d.label_noise == 0 or not _is_text(d.dataset),
        f"data.label_noise = {d.label_noise} flips class labels, but {d.dataset!r} is text (next-character "
        "targets); use an image data set or data.label_noise = 0.",
    )


def _splits_leave_a_test_split(cfg: Config) -> None:
    p = cfg.partition
    _check(
        p.train_fraction + p.val_fraction < 1,
        "partition.train_fraction and partition.val_fraction must be > 0 and sum to less than 1 "
        f"(the test split gets the rest), got {p.train_fraction} and {p.val_fraction}",
    )


def _winsor_c_leaves_gradients_unclipped(cfg: Config) -> None:
    """``strategy.winsor_c`` against ``strategy.batch_size`` (coherent gradients, Chatterjee, ICLR 2020)."""
    s = cfg.strategy
    _check(
        s.gradient != "winsorized" or 2 * s.winsor_c < s.batch_size,
        f"strategy.winsor_c must be >= 0 and less than half of strategy.batch_size ({s.batch_size}) so "
        f"that some gradients are left unclipped, got {s.winsor_c}",
    )


def _client_level_dp_is_sound(cfg: Config) -> None:
    """What ``update.noise_multiplier > 0`` and adaptive clipping need from the other ``update`` keys.

    The checks that also need the federation (``delta`` below 1 / training clients, ``pld`` only
    with ``strategy.fraction_fit = 1``, strategies that upload what cannot be clipped) are in
    ``fedmem.privacy``, where the training clients are known.
    """
    u = cfg.update
    _check(
        u.noise_multiplier == 0 or u.clip_norm > 0,
        f"update.noise_multiplier must be >= 0 and needs update.clip_norm > 0 (noise is scaled by the "
        f"clipping norm), got noise_multiplier {u.noise_multiplier} with clip_norm {u.clip_norm}",
    )
    _check(
        u.noise_multiplier == 0 or u.weighting == "uniform",
        "update.noise_multiplier > 0 needs update.weighting = 'uniform': with example weights one client "
        "holding many examples moves the average by more than clip_norm / (clients sampled), which the "
        "noise does not cover",
    )
    _check(
        u.clipping == "fixed" or u.clip_norm > 0,
        "update.clipping = 'adaptive' needs update.clip_norm > 0 (the initial clip norm)",
    )
    _check(
        u.clipping == "fixed" or u.noise_multiplier == 0 or 2 * u.count_noise_std > u.noise_multiplier,
        f"update.count_noise_std = {u.count_noise_std} must be more than update.noise_multiplier / 2 = "
        f"{u.noise_multiplier / 2:g} with adaptive clipping: the clipped count's noise alone would spend "
        "the whole privacy budget (Andrew et al. suggest about expected clients per round / 20)",
    )
    _check(
        u.aggregate == "mean" or u.noise_multiplier == 0,
        f"update.aggregate = {u.aggregate!r} cannot be used with update.noise_multiplier > 0: client-level "
        "DP releases only the noisy mean of the clipped updates, so there is nothing left to take a median "
        "of; use update.aggregate = 'mean' or update.noise_multiplier = 0",
    )


def _audit_index_names_a_federation(cfg: Config) -> None:
    a = cfg.audit
    limit = {"shadow": a.shadows, "subsample": a.subsamples}.get(a.role)
    _check(
        limit is None or a.index < limit,
        f"audit.index must be in [0, audit.{a.role}s) for role {a.role!r}, got {a.index}",
    )


def _clients_fit_the_cpus(cfg: Config) -> None:
    """``runtime.cpus_per_client`` against the CPUs fedmem's own Ray gets (a cluster sizes its own)."""
    r = cfg.runtime
    _check(
        not (r.ray_address and r.num_cpus),
        f"runtime.num_cpus = {r.num_cpus} sizes a Ray that fedmem starts itself; with runtime.ray_address "
        "the cluster's nodes bring their own CPUs, so leave runtime.num_cpus at 0",
    )
    available = r.num_cpus or os.cpu_count() or 1
    # A cluster's nodes (the key, or Ray's RAY_ADDRESS convention) are sized by the cluster check.
    joins_cluster = bool(r.ray_address or os.environ.get("RAY_ADDRESS", "").strip())
    _check(
        joins_cluster or r.cpus_per_client <= available,
        f"runtime.cpus_per_client = {r.cpus_per_client} is more than the {available} CPUs available "
        f"({'runtime.num_cpus' if r.num_cpus else 'this machine'}): no client could ever be scheduled",
    )


# --------------------------------------------------------------------------- loading


def scenario_path(name_or_path: str) -> Path | None:
    """Resolve a scenario argument: an existing file, else ``simulations/<name>.toml``.

    Returns ``None`` for ``"default"`` when no file exists (the dataclass defaults are the default scenario).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    for base in (Path.cwd() / "simulations", SIMULATIONS_DIR):
        candidate = base / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    if name_or_path == "default":
        return None
    known = sorted(p.stem for p in SIMULATIONS_DIR.glob("*.toml"))
    raise ConfigError(
        f"scenario {name_or_path!r} is neither a TOML file nor a name in simulations/; "
        f"valid names: {', '.join(known) or 'none found'}"
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as TOML, or as a bare string if that fails."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects KEY=VALUE with a dotted key (e.g. strategy.lr=0.05), got {item!r}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (copying the tables it touches)."""
    out = _deep_copy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {item!r}: {'.'.join(path[: i + 1])} is a value, not a table")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def load_config(name_or_path: str = "default", overrides: Sequence[str] = ()) -> Config:
    """Load a scenario by name or path, apply ``--set`` overrides and validate.

    Parameters
    ----------
    name_or_path:
        A TOML file, or the name of a file in ``simulations/`` (``"default"``).
    overrides:
        ``"section.key=value"`` strings, applied in order.
    """
    path = scenario_path(name_or_path)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8."
            ) from None
        except OSError as exc:
            raise ConfigError(f"{path} cannot be read ({exc.strerror or exc}).") from None
        raw.setdefault("name", path.stem)
    return from_dict(apply_overrides(raw, overrides))


def from_json(text: str) -> Config:
    """Inverse of :meth:`Config.to_json`."""
    return from_dict(json.loads(text))
