"""The one configuration tree: frozen dataclasses loaded from TOML, overridden by dotted keys.

A scenario is a TOML file in ``simulations/``; every key is optional and falls
back to the defaults below (``simulations/default.toml`` spells them out and a
test keeps the two equal). ``--set section.key=value`` overrides any key.
Validation happens here, before anything starts: an unknown key, a wrong type
or an unknown name (strategy, data set, partition scheme, model, index) raises
:class:`~fedmem.errors.ConfigError` with one sentence naming the key and the
valid choices. Every number must be finite and >= 0 unless a key's own check says more; a field
declared with ``metadata=within("[0, 1)")`` gets that interval checked too (strategies use it).

Strategy-specific hyperparameters live in a sub-table named after the strategy
(``[strategy.fedprox] mu = 0.01``). This module keeps those tables as given;
each strategy parses its own into its ``Params`` dataclass, and the names are
checked where the strategies' registry is loaded (``strategies.check_config``),
so this module never imports ``strategies``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from fedmem.errors import ConfigError

SIMULATIONS_DIR = Path(__file__).resolve().parent.parent / "simulations"


@dataclass(frozen=True)
class DataConfig:
    """Which data set to load and from where."""

    dataset: str = "fashion_mnist"
    root: str = "data"  # searched first; torchvision downloads here when nothing is found
    max_samples: int = 0  # 0 = all; otherwise a seeded random subset (quick runs, tests)
    download: bool = True
    seq_len: int = 80  # text data sets: characters per next-character window
    tasks: str = ""  # "" | permuted | permuted_marked: each client's own task (fedmem.data.tasks)
    marker_cell: int = 2  # permuted_marked: pixels per side of one bit of the client's corner marker
    # fraction of each noisy client's train labels flipped to another class (fedmem.data.noise); 0 = off
    label_noise: float = 0.0
    noisy_clients: tuple[int, ...] = ()  # partition ids whose train labels flip; () = every seen client


@dataclass(frozen=True)
class PartitionConfig:
    """How the pooled data set is split into clients, and each client into train/val/test."""

    scheme: str = "dirichlet"
    num_clients: int = 20
    alpha: float = 0.3  # dirichlet concentration: smaller = more label skew
    classes_per_client: int = 2  # pathological scheme only
    min_size: int = 10
    train_fraction: float = 0.7
    val_fraction: float = 0.15  # test gets the rest
    unseen_fraction: float = 0.2  # clients held out of training, evaluated after it


@dataclass(frozen=True)
class ModelConfig:
    """The backbone: ``features(x) -> embedding`` and ``head(z) -> logits``."""

    name: str = "cnn"
    embedding_dim: int = 64


@dataclass(frozen=True)
class NoParams:
    """A strategy without hyperparameters of its own."""


@dataclass(frozen=True)
class StrategyConfig:
    """The training strategy, client sampling and the local optimizer (SGD with momentum).

    ``params`` holds the strategy's own hyperparameters, from ``[strategy.<name>]``.
    """

    name: str = "fedavg"
    fraction_fit: float = 1.0  # fraction of seen clients sampled each round
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    local_epochs: int = 1
    local_steps: int = 0  # > 0 replaces local_epochs by a fixed number of mini-batch steps
    batch_size: int = 32
    loss: str = "ce"  # ce | rll | gce: the loss of every local training step (fedmem.losses)
    loss_alpha: float = 0.1  # rll: alpha > 0
    loss_q: float = 0.7  # gce: q in (0, 1]
    # the gradient of each local step (coherent gradients): mean | winsorized | median3
    gradient: str = "mean"
    winsor_c: int = 1  # winsorized: values clipped at each end of every coordinate, per batch
    # dpsgd (sample-level DP-SGD, Abadi et al. 2016): per-example L2 clip norm C and noise multiplier z
    dp_clip: float = 1.0
    dp_noise: float = 1.0
    # [strategy.<name>] tables as given, for the strategy and the personalizers; each parses its own
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class FinetuneConfig:
    """Local fine-tuning of the trained model on each client's train split (FedAvg+FT)."""

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 32


@dataclass(frozen=True)
class MemoryConfig:
    """kNN-Per's per-client memory (Marfoq et al., ICML 2022)."""

    index: str = "flat"  # flat (exact), ivf, hnsw
    capacity: int = 0  # 0 = the whole train split
    k_grid: tuple[int, ...] = (5, 10, 20)
    lambda_grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    temperature: float = 0.0  # kernel exp(-d / T) on squared L2 distances; 0 = T = model.embedding_dim
    nprobe: int = 8  # ivf only
    hnsw_m: int = 32  # hnsw only
    ef_search: int = 64  # hnsw only
    mix_logits: bool = False  # compatibility: mix p_kNN with raw logits like the reference code
    # private memory (fedmem.memory.datastore): drop stored exact copies of a query when searching;
    # Gaussian noise of this std on every stored embedding (0 = none)
    exclude_self: bool = False
    embedding_noise: float = 0.0


@dataclass(frozen=True)
class EvalConfig:
    """Personalized evaluation of every client on its own test split."""

    personalizers: tuple[str, ...] = ("finetune", "knnper")  # strategies whose personalize hook is applied
    batch_size: int = 256  # inference batches; larger ones were slower on CPU (cache)
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

    clip_norm: float = 0.0  # 0 = no clipping; the initial clip norm with clipping = "adaptive"
    noise_multiplier: float = 0.0  # 0 = no noise; needs clip_norm > 0 and weighting = "uniform"
    # how the server weights clients: "examples" (FedAvg) or "uniform" (client-level DP needs it)
    weighting: str = "examples"
    delta: float = 1e-5  # epsilon is reported at this delta; must be below 1 / (training clients)
    accountant: str = "rdp"  # rdp (any fraction_fit) or pld (tighter; fraction_fit = 1 only)
    clipping: str = "fixed"  # fixed | adaptive (Andrew et al. 2021: C tracks a quantile of update norms)
    target_quantile: float = 0.5  # adaptive: gamma, the fraction of updates meant to stay unclipped
    clip_lr: float = 0.2  # adaptive: eta_C of the geometric update C <- C exp(-eta_C (b - gamma))
    count_noise_std: float = 0.0  # adaptive: sigma_b, noise std on the count of unclipped clients
    aggregate: str = "mean"  # mean | median | trimmed_mean
    trim_fraction: float = 0.1  # trimmed_mean: fraction of clients cut at each end, per coordinate


LOSSES = ("ce", "rll", "gce")  # strategy.loss: the functions are in fedmem.losses
WEIGHTINGS = ("examples", "uniform")
ACCOUNTANTS = ("rdp", "pld")
CLIPPINGS = ("fixed", "adaptive")

AUDIT_ROLES = ("", "target", "shadow", "subsample")


@dataclass(frozen=True)
class AuditConfig:
    """The leakage audit (``fedmem audit``): shadow federations, image canaries, subsampled federations.

    ``role`` and ``index`` say which federation of an audit this config describes; ``fedmem audit``
    sets them, so each federation's ``config.toml`` reproduces it with ``fedmem run``. With the
    default ``role = ""`` a run is a plain federation and nothing here changes it.
    """

    shadows: int = 16  # LiRA shadow federations (each train example IN with probability 1/2); 0 = off
    canary_clients: int = 2  # seen clients that insert canaries into their train split; 0 = off
    repetitions: tuple[int, ...] = (1, 4, 16)  # how many times each canary is repeated
    canaries_per_repetition: int = 4  # distinct canaries per client and repetition count
    references: int = 1000  # never-inserted reference candidates that canaries are ranked against
    subsamples: int = 32  # federations on a random half of the seen clients; 0 = off
    canary_format: str = "the random number is {}{}{}{}{}{}"  # text data sets: each {} is one digit
    role: str = ""  # "" plain run | target | shadow | subsample (set by fedmem audit)
    index: int = 0  # which shadow or subsampled federation (role shadow / subsample)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the simulation runs."""

    engine: str = "flower"  # flower (Ray simulation engine) or inprocess (same hooks, one process)
    cpus_per_client: int = 1
    num_cpus: int = 0  # CPUs given to Ray; 0 = all of this machine's
    output_dir: str = "runs"
    max_failure_fraction: float = 0.5  # stop when more clients than this fail in one round
    round_timeout: float = 0.0  # seconds to wait for one round's replies (flower engine); 0 = no limit
    run_dir: str = ""  # set by the runner; clients keep per-client files under it
    checkpoint_every: int = 1  # rounds between checkpoints (fedmem resume RUN_DIR); 0 = none
    # "" = start a local Ray (or join RAY_ADDRESS if set); "auto" or "HOST:PORT" = join that cluster
    ray_address: str = ""


@dataclass(frozen=True)
class Config:
    """A whole scenario."""

    name: str = "default"
    seed: int = 0
    rounds: int = 10
    eval_every: int = 5  # evaluate all clients every this many rounds, and always after the last
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
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys, wrong types and bad ranges.

    Every number (and number in a list) must be finite and >= 0: no count, size, rate or weight of
    the tree means anything below zero. A field can narrow that with ``metadata=within("(0, 1]")``.

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
    _check_ranges(built, prefix)
    return built


def _build(cls: type[Any], table: Mapping[str, Any], prefix: str) -> Any:
    """:func:`build_dataclass` without the range checks (``validate`` runs them last, after its own)."""
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


_INTERVAL = re.compile(r"([\[(])\s*([-+\w.]+)\s*,\s*([-+\w.]+)\s*([\])])")


def within(interval: str) -> dict[str, Any]:
    """Field metadata: :func:`build_dataclass` refuses a value (or list element) outside ``interval``.

    ``interval`` is written as in mathematics, e.g. ``"[0, 1)"`` or ``"(0, inf)"``; the error message
    quotes it as written.
    """
    match = _INTERVAL.fullmatch(interval.strip())
    if match is None:
        raise ValueError(f"interval {interval!r} is not written like '[0, 1)' or '(0, inf)'")
    return {"interval": (interval.strip(), *match.groups())}


def _inside(value: float, interval: tuple[str, str, str, str, str]) -> bool:
    _, left, low, high, right = interval
    # written so that NaN is outside every interval
    above = value > float(low) if left == "(" else value >= float(low)
    below = value < float(high) if right == ")" else value <= float(high)
    return above and below


def _check_ranges(node: Any, prefix: str) -> None:
    """Refuse non-finite and negative numbers, and numbers outside a field's ``within`` interval.

    Walks a built dataclass and its nested ones; ``strategy.params`` is skipped (each strategy
    checks its own table when it parses it with :func:`build_dataclass`).
    """
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{key}.")
            continue
        if isinstance(value, dict):
            continue
        _check_finite(value, key)
        interval = f.metadata.get("interval")
        many = isinstance(value, tuple)
        for v in value if many else (value,):
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            ok, what = (_inside(v, interval), f"in {interval[0]}") if interval else (v >= 0, ">= 0")
            shown = list(value) if many else v
            _check(ok, f"{key} must {'hold values' if many else 'be'} {what}, got {shown}")


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


def validate(cfg: Config) -> None:
    """Check values and names; raise :class:`ConfigError` naming the key and the valid choices."""
    from fedmem.data.datasets import DATASETS
    from fedmem.data.partition import SCHEMES
    from fedmem.memory.datastore import INDEXES
    from fedmem.models import MODELS

    _check_finite(cfg, "")
    _check(
        re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.name) is not None,
        f"name = {cfg.name!r} must be a plain name (letters, digits, '.', '_', '-'; not a path): "
        "it names the run directory inside the output directory",
    )
    DATASETS.get(cfg.data.dataset)
    SCHEMES.get(cfg.partition.scheme)
    MODELS.get(cfg.model.name)
    INDEXES.get(cfg.memory.index)
    engine = cfg.runtime.engine
    valid_engines = ", ".join(ENGINES)
    _check(engine in ENGINES, f"runtime.engine = {engine!r} is not known; valid choices: {valid_engines}")
    _check(cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}")
    _check(cfg.rounds >= 0, f"rounds must be >= 0 (0 = evaluate the initial model), got {cfg.rounds}")
    _check(cfg.eval_every >= 1, f"eval_every must be >= 1, got {cfg.eval_every}")
    _check(cfg.data.max_samples >= 0, f"data.max_samples must be >= 0 (0 = all), got {cfg.data.max_samples}")
    _check(cfg.data.seq_len >= 2, f"data.seq_len must be >= 2 characters, got {cfg.data.seq_len}")
    _validate_tasks(cfg)
    _validate_label_noise(cfg)
    p = cfg.partition
    _check(p.num_clients >= 1, f"partition.num_clients must be >= 1, got {p.num_clients}")
    _check(p.alpha > 0, f"partition.alpha must be > 0, got {p.alpha}")
    _check(
        p.classes_per_client >= 1,
        f"partition.classes_per_client must be >= 1 (pathological scheme), got {p.classes_per_client}",
    )
    _check(
        p.train_fraction > 0 and p.val_fraction > 0 and p.train_fraction + p.val_fraction < 1,
        "partition.train_fraction and partition.val_fraction must be > 0 and sum to less than 1 "
        f"(the test split gets the rest), got {p.train_fraction} and {p.val_fraction}",
    )
    _check(
        0 <= p.unseen_fraction < 1, f"partition.unseen_fraction must be in [0, 1), got {p.unseen_fraction}"
    )
    _check(cfg.model.embedding_dim >= 1, f"model.embedding_dim must be >= 1, got {cfg.model.embedding_dim}")
    s = cfg.strategy
    _check(0 < s.fraction_fit <= 1, f"strategy.fraction_fit must be in (0, 1], got {s.fraction_fit}")
    _check(s.lr > 0, f"strategy.lr must be > 0, got {s.lr}")
    _check(0 <= s.momentum < 1, f"strategy.momentum must be in [0, 1), got {s.momentum}")
    _check(s.weight_decay >= 0, f"strategy.weight_decay must be >= 0, got {s.weight_decay}")
    _check(s.local_epochs >= 1, f"strategy.local_epochs must be >= 1, got {s.local_epochs}")
    _check(
        s.local_steps >= 0, f"strategy.local_steps must be >= 0 (0 = use local_epochs), got {s.local_steps}"
    )
    _check(s.batch_size >= 1, f"strategy.batch_size must be >= 1, got {s.batch_size}")
    _validate_loss(s)
    _validate_gradient(s)
    f = cfg.finetune
    _check(f.epochs >= 0, f"finetune.epochs must be >= 0, got {f.epochs}")
    _check(f.lr > 0, f"finetune.lr must be > 0, got {f.lr}")
    _check(0 <= f.momentum < 1, f"finetune.momentum must be in [0, 1), got {f.momentum}")
    _check(f.batch_size >= 1, f"finetune.batch_size must be >= 1, got {f.batch_size}")
    m = cfg.memory
    _check(m.capacity >= 0, f"memory.capacity must be >= 0 (0 = unlimited), got {m.capacity}")
    k_ok = len(m.k_grid) > 0 and min(m.k_grid) >= 1
    _check(k_ok, f"memory.k_grid must be a non-empty list of k >= 1, got {list(m.k_grid)}")
    _check(
        len(m.lambda_grid) > 0 and all(0 <= v <= 1 for v in m.lambda_grid),
        f"memory.lambda_grid must be a non-empty list of values in [0, 1], got {list(m.lambda_grid)}",
    )
    _check(
        m.temperature >= 0, f"memory.temperature must be >= 0 (0 = model.embedding_dim), got {m.temperature}"
    )
    for key in ("nprobe", "hnsw_m", "ef_search"):
        value = getattr(m, key)
        _check(value >= 1, f"memory.{key} must be >= 1, got {value}")
    _check(
        m.embedding_noise >= 0,
        f"memory.embedding_noise must be a standard deviation >= 0 (0 = no noise), got {m.embedding_noise}",
    )
    u = cfg.update
    _check(u.clip_norm >= 0, f"update.clip_norm must be >= 0 (0 = no clipping), got {u.clip_norm}")
    _check(
        u.noise_multiplier >= 0 and (u.noise_multiplier == 0 or u.clip_norm > 0),
        f"update.noise_multiplier must be >= 0 and needs update.clip_norm > 0 (noise is scaled by the "
        f"clipping norm), got noise_multiplier {u.noise_multiplier} with clip_norm {u.clip_norm}",
    )
    _validate_privacy(u)
    _validate_aggregate(u)
    _check(cfg.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}")
    _validate_audit(cfg.audit)
    r = cfg.runtime
    _check(r.round_timeout >= 0, f"runtime.round_timeout must be >= 0 (0 = no limit), got {r.round_timeout}")
    _check(r.cpus_per_client >= 1, f"runtime.cpus_per_client must be >= 1, got {r.cpus_per_client}")
    _check(r.num_cpus >= 0, f"runtime.num_cpus must be >= 0 (0 = all), got {r.num_cpus}")
    _check(
        r.checkpoint_every >= 0,
        f"runtime.checkpoint_every must be >= 0 (0 = no checkpoints), got {r.checkpoint_every}",
    )
    check_ray_address(r.ray_address, "runtime.ray_address")
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
    _check(
        0 <= r.max_failure_fraction < 1,
        f"runtime.max_failure_fraction must be in [0, 1), got {r.max_failure_fraction}",
    )
    _check_ranges(cfg, "")  # last: keys without a check of their own (and keys added later)


ENGINES = ("flower", "inprocess")


def _validate_gradient(s: StrategyConfig) -> None:
    """``strategy.gradient`` and its ``winsor_c`` (coherent gradients, Chatterjee, ICLR 2020)."""
    from fedmem.training import GRADIENTS

    _check(
        s.gradient in GRADIENTS,
        f"strategy.gradient = {s.gradient!r} is not known; valid choices: {', '.join(GRADIENTS)}",
    )
    _check(
        s.gradient != "winsorized" or 2 * s.winsor_c < s.batch_size,
        f"strategy.winsor_c must be >= 0 and less than half of strategy.batch_size ({s.batch_size}) so "
        f"that some gradients are left unclipped, got {s.winsor_c}",
    )
    _check(
        s.dp_clip > 0 and math.isfinite(s.dp_clip),
        "strategy.dp_clip must be a finite number > 0 (the L2 bound of each example's gradient), "
        f"got {s.dp_clip}",
    )
    _check(
        s.dp_noise >= 0,
        "strategy.dp_noise must be >= 0 (the noise std over strategy.dp_clip; 0 = no noise), "
        f"got {s.dp_noise}",
    )


def _validate_aggregate(u: UpdateConfig) -> None:
    """``update.aggregate`` and its ``trim_fraction`` (robust aggregation, Yin et al., ICML 2018)."""
    from fedmem.updates import AGGREGATES

    _check(
        u.aggregate in AGGREGATES,
        f"update.aggregate = {u.aggregate!r} is not known; valid choices: {', '.join(AGGREGATES)}",
    )
    _check(
        0 <= u.trim_fraction < 0.5,
        f"update.trim_fraction must be in [0, 0.5) (the fraction of clients cut at each end), "
        f"got {u.trim_fraction}",
    )
    _check(
        u.aggregate == "mean" or u.noise_multiplier == 0,
        f"update.aggregate = {u.aggregate!r} cannot be used with update.noise_multiplier > 0: client-level "
        "DP releases only the noisy mean of the clipped updates, so there is nothing left to take a median "
        "of; use update.aggregate = 'mean' or update.noise_multiplier = 0",
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


def _check_finite(node: Any, key: str, *, element: bool = False) -> None:
    """Refuse NaN and infinity anywhere in the tree (strategy tables too), naming the key.

    Range checks compare with ``>`` and ``<``, which NaN passes and infinity often does: an
    infinite learning rate would otherwise fail only after the first round of training.
    """
    if isinstance(node, float):
        what = "hold finite numbers" if element else "be a finite number"
        _check(node == node and abs(node) != float("inf"), f"{key} must {what}, got {node}")
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            # [strategy.<name>] tables are written without "params" in their keys
            child = key if f.name == "params" else f"{key}.{f.name}" if key else f.name
            _check_finite(getattr(node, f.name), child)
    elif isinstance(node, Mapping):
        for k, v in node.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(node, list | tuple):
        for v in node:
            _check_finite(v, key, element=True)


def _validate_tasks(cfg: Config) -> None:
    from fedmem.data.datasets import DATASETS
    from fedmem.data.tasks import MAX_MARKED_CLIENTS, TASKS
    from fedmem.data.text import SnapshotSource

    d = cfg.data
    valid = ", ".join(repr(t) for t in TASKS)
    _check(d.tasks in TASKS, f"data.tasks = {d.tasks!r} is not known; valid choices: {valid}")
    _check(d.marker_cell >= 1, f"data.marker_cell must be >= 1 pixel, got {d.marker_cell}")
    if not d.tasks:
        return
    _check(
        not isinstance(DATASETS.get(d.dataset), SnapshotSource),
        f"data.tasks = {d.tasks!r} relabels classes and marks images, but {d.dataset!r} is text; "
        "use an image data set or data.tasks = ''.",
    )
    _check(
        d.tasks != "permuted_marked" or cfg.partition.num_clients <= MAX_MARKED_CLIENTS,
        f"data.tasks = 'permuted_marked' writes client ids in a {MAX_MARKED_CLIENTS.bit_length() - 1}-bit "
        f"marker, so partition.num_clients must be <= {MAX_MARKED_CLIENTS}, got {cfg.partition.num_clients}",
    )


def _validate_privacy(u: UpdateConfig) -> None:
    for key, value, choices in (
        ("weighting", u.weighting, WEIGHTINGS),
        ("accountant", u.accountant, ACCOUNTANTS),
        ("clipping", u.clipping, CLIPPINGS),
    ):
        valid = ", ".join(repr(c) for c in choices)
        _check(value in choices, f"update.{key} = {value!r} is not known; valid choices: {valid}")
    _check(0 < u.delta < 1, f"update.delta must be in (0, 1), got {u.delta}")
    _check(0 <= u.target_quantile <= 1, f"update.target_quantile must be in [0, 1], got {u.target_quantile}")
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


def _validate_loss(s: StrategyConfig) -> None:
    valid = ", ".join(repr(n) for n in LOSSES)
    _check(s.loss in LOSSES, f"strategy.loss = {s.loss!r} is not known; valid choices: {valid}")
    _check(
        s.loss_alpha > 0, f"strategy.loss_alpha (the robust log loss's alpha) must be > 0, got {s.loss_alpha}"
    )
    _check(
        0 < s.loss_q <= 1,
        f"strategy.loss_q (the generalized cross-entropy's q) must be in (0, 1], got {s.loss_q}",
    )


def _validate_label_noise(cfg: Config) -> None:
    from fedmem.data.datasets import DATASETS
    from fedmem.data.text import SnapshotSource

    d, n = cfg.data, cfg.partition.num_clients
    _check(0 <= d.label_noise <= 1, f"data.label_noise must be in [0, 1] (0 = off), got {d.label_noise}")
    _check(
        all(0 <= c < n for c in d.noisy_clients) and len(set(d.noisy_clients)) == len(d.noisy_clients),
        f"data.noisy_clients must list distinct partition ids in [0, partition.num_clients) = [0, {n}) "
        f"(or be [] for every seen client), got {list(d.noisy_clients)}",
    )
    _check(
        d.label_noise == 0 or not isinstance(DATASETS.get(d.dataset), SnapshotSource),
        f"data.label_noise = {d.label_noise} flips class labels, but {d.dataset!r} is text (next-character "
        "targets); use an image data set or data.label_noise = 0.",
    )


def _validate_audit(a: AuditConfig) -> None:
    _check(a.shadows >= 0, f"audit.shadows must be >= 0 (0 = no LiRA), got {a.shadows}")
    _check(
        a.shadows == 0 or a.shadows >= 4,
        f"audit.shadows must be 0 or at least 4 (LiRA fits each shadow's IN and OUT Gaussians on the "
        f"others), got {a.shadows}",
    )
    _check(
        a.canary_clients >= 0, f"audit.canary_clients must be >= 0 (0 = no canaries), got {a.canary_clients}"
    )
    _check(
        len(a.repetitions) > 0 and min(a.repetitions) >= 1 and len(set(a.repetitions)) == len(a.repetitions),
        f"audit.repetitions must be a non-empty list of distinct counts >= 1, got {list(a.repetitions)}",
    )
    _check(
        a.canaries_per_repetition >= 1,
        f"audit.canaries_per_repetition must be >= 1, got {a.canaries_per_repetition}",
    )
    _check(a.references >= 1, f"audit.references must be >= 1, got {a.references}")
    _check(a.subsamples >= 0, f"audit.subsamples must be >= 0 (0 = no counterfactual), got {a.subsamples}")
    _check(a.subsamples != 1, "audit.subsamples must be 0 or at least 2 (each client must be in and out)")
    from fedmem.probes._validate import ProbeInputError
    from fedmem.probes.canaries import CanaryFormat

    try:
        CanaryFormat(a.canary_format)
    except ProbeInputError as exc:
        raise ConfigError(f"audit.canary_format: {exc}") from None
    roles = ", ".join(repr(r) for r in AUDIT_ROLES)
    _check(a.role in AUDIT_ROLES, f"audit.role = {a.role!r} is not known; valid choices: {roles}")
    limit = {"shadow": a.shadows, "subsample": a.subsamples}.get(a.role)
    _check(
        a.index >= 0 and (limit is None or a.index < limit),
        f"audit.index must be in [0, audit.{a.role}s) for role {a.role!r}, got {a.index}"
        if limit is not None
        else f"audit.index must be >= 0, got {a.index}",
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
