"""Compose the Hydra configuration in ``conf/`` into a validated, typed :class:`RunPlan`.

Hydra is the only place configuration is composed. The ServerApp, every ClientApp
and the CLI call :func:`compose` with the same experiment name and override string
and so agree on sites, model and training settings. The composed config is merged
into the dataclass schema below, so a misspelt key is an error, not a silent no-op.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fl_imaging.data.regions import scheme_problems
from fl_imaging.secagg.settings import secure_aggregation_problems

CONF_DIR_ENV = "FL_IMAGING_CONF"
KNOWN_MODELS = ("unet", "features")
KNOWN_STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedavgm",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)
KNOWN_ACCOUNTANTS = ("rdp", "prv", "gdp")
KNOWN_GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew")
KNOWN_NORMS = ("instance", "group", "batch")
KNOWN_OPTIMIZERS = ("adam", "sgd")
# learning rate over the rounds (fl_imaging.ml.training.round_lr)
KNOWN_LR_SCHEDULES = ("constant", "cosine")
KNOWN_ACTS = ("relu", "prelu", "leakyrelu")
# mixed precision of training and evaluation (fl_imaging.ml.devices.autocast)
KNOWN_AMP = ("off", "bf16", "fp16")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key (and site)."""


@dataclass
class SiteBudget:
    """A site's own differential-privacy budget for the whole run (DP-SGD at the site)."""

    # None: the site trains without differential privacy
    epsilon: float | None = None
    # None: privacy.delta, else min(1e-5, N^-1.1) for N training cases
    delta: float | None = None
    # per-sample gradient clipping norm; None: privacy.max_grad_norm
    max_grad_norm: float | None = None


@dataclass
class SiteConfig:
    """One hospital: its name, where its data and state live, its own settings."""

    name: str = MISSING
    manifest: str = MISSING
    # folder the manifest's relative case paths resolve against (None: the manifest's own)
    data_root: str | None = None
    # site-local state (privacy ledger, caches); None: <paths.state>/<name>
    state_dir: str | None = None
    privacy: SiteBudget = field(default_factory=SiteBudget)
    # None: train.local_epochs / train.batch_size
    local_epochs: int | None = None
    batch_size: int | None = None


@dataclass
class SimulationConfig:
    """How the local simulation sizes itself (ignored in deployment)."""

    # virtual SuperNodes; None: one per site
    num_supernodes: int | None = None
    # resources each virtual site gets from the simulation engine
    num_cpus_per_site: float = 1.0
    # share of a GPU each virtual site gets (0.25: four sites per GPU at a time), or
    # "auto": measured and planned by `fl-imaging run` from the number of sites, the
    # GPU's memory and one site's measured peak (fl_imaging.tools.gpu_share); 0: CPU
    num_gpus_per_site: float | int | str = 0.0
    # with num_gpus_per_site=auto: the fraction of the GPU's free memory the plan fills
    gpu_memory_use: float = 0.9


@dataclass
class FederationConfig:
    """The sites taking part."""

    sites: list[SiteConfig] = field(default_factory=list)
    # default data_root for every site that sets none
    data_root: str | None = None
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    # site name -> SHA-256 fingerprint of the SuperNode public key registered for it
    # (`fl-imaging site fingerprint KEY.pub`); empty: a node's site is what it declares.
    # Set: the server admits a node only as the site its key belongs to (fl_imaging.server.identity)
    site_keys: dict[str, str] = field(default_factory=dict)


@dataclass
class CentralDPConfig:
    """Flower's server-side DP (fixed clipping) for the aggregate.

    The server clips each site's update and noises the aggregate: a user-level
    guarantee that trusts the server, unlike DP-SGD at the sites (sample-level).
    """

    # None: off. Noise std = noise_multiplier x clipping_norm / number of sites
    noise_multiplier: float | None = None
    # L2 bound on each site's update (new weights - global weights)
    clipping_norm: float = 1.0


@dataclass
class ClipGroupConfig:
    """One group of weights clipped on its own (``privacy.clip_groups``)."""

    prefix: str = MISSING  # the weights whose names start with it
    share: float = MISSING  # its clipping norm, as a fraction of privacy.max_grad_norm


@dataclass
class PrivacyConfig:
    """How private sites run DP-SGD (each site's budget lives in its federation entry)."""

    # Opacus accountant: rdp, prv or gdp
    accountant: str = "rdp"
    # Opacus grad-sample mode: hooks (with fl-imaging's convolution/PReLU samplers,
    # fastest measured on CPU), functorch, ew
    grad_sample_mode: str = "hooks"
    # defaults for sites whose budget leaves them out; delta null: min(1e-5, N^-1.1) for a
    # site with N training cases (fl_imaging.privacy.accounting.default_delta)
    delta: float | None = None
    max_grad_norm: float = 1.0
    # learning rate of the sites that train with DP-SGD (their train.lr_schedule still
    # applies); None: train.lr. Clipped steps are at most lr x max_grad_norm long, so a
    # private recipe's lr belongs with its norm, not with the sites that train without DP
    lr: float | None = None
    # seconds a private round waits for another training of the same site (same state
    # folder) to release the privacy lock before it is refused
    lock_timeout: float = 60.0
    # augmentation multiplicity: K augmented views of each sampled patient, their
    # gradients averaged before clipping (still one clipped contribution per patient
    # per step); K times the compute of a step
    augmentations: int = 1
    # at most this many cases (times augmentations) through the network at once: larger
    # Poisson batches are split and their clipped gradients summed before the one noisy
    # step (Opacus' BatchMemoryManager; same privacy, bounded memory); 0: no limit
    max_physical_batch: int = 16
    # flat (one norm over all weights) or per_layer (each weight tensor clipped to
    # max_grad_norm / sqrt(tensors): the same sensitivity and noise, Opacus' per-layer)
    clipping: str = "flat"
    # flat clipping in groups (e.g. [{prefix: model.2, share: 0.5}]: the output stage):
    # each patient's gradient over a group's weights is clipped to share x max_grad_norm
    # and over the weights in no group to sqrt(1 - sum of squared shares) x
    # max_grad_norm, so the whole stays within max_grad_norm: the same sensitivity,
    # noise and accounting; []: off
    clip_groups: list[ClipGroupConfig] = field(default_factory=list)
    # private fine-tuning: train only parameters whose name starts with one of these
    # (e.g. ["model.2"] for the output stage); empty: all. Frozen weights carry no noise
    trainable: list[str] = field(default_factory=list)
    # after every DP-SGD step, rescale each trained convolution kernel but the network's
    # last to the norm of its default initialisation (sqrt(shape[0] / 3)), so that the
    # noise cannot inflate it (post-processing of the noisy step: no privacy cost);
    # measured lower on synthetic hospitals (docs/RESULTS.md), hence off
    hold_norms: bool = False
    central: CentralDPConfig = field(default_factory=CentralDPConfig)


@dataclass
class ModelConfig:
    """The network: MONAI's UNet, or fixed image features and a small trained head.

    ``features`` (fl_imaging.ml.features): ``channels`` are the head's hidden widths,
    ``strides`` must be empty, ``scales`` / ``hessian_scales`` the features' scales.
    """

    # unet (MONAI's UNet) or features (fixed multi-scale features, a per-voxel MLP)
    name: str = "unet"
    channels: list[int] = field(default_factory=lambda: [8, 16, 32])
    strides: list[int] = field(default_factory=lambda: [2, 2])
    num_res_units: int = 1
    norm: str = "instance"
    # prelu (MONAI's default), leakyrelu (prelu's initial slope 0.25, fixed: no weights
    # of its own) or relu; PReLU's per-sample gradients are cheap
    # (fl_imaging.privacy.grad_samplers), so the activation is not what DP-SGD costs
    act: str = "prelu"
    dropout: float = 0.0
    # groups of model.norm=group (GroupNorm): must divide every entry of channels and
    # the number of classes (1: statistics over all channels of a layer)
    num_groups: int = 1
    # start the run from these weights (a run folder's checkpoint, e.g.
    # outputs/<run>/checkpoints/last.pt, or a saved state dict) instead of a fresh
    # initialisation; they must fit this model config
    init_checkpoint: str | None = None
    # model.name=features: Gaussian scales (voxels) of the smoothed intensity, its
    # Laplacian and gradient magnitude, and of the Hessian's eigenvalues
    scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    hessian_scales: list[float] = field(default_factory=lambda: [1.5, 3.0])


@dataclass
class DataConfig:
    """What the sites' data holds, and the preprocessing and augmentation they share."""

    # input channels, in order; every site's manifest must declare the same number
    modalities: list[str] = field(default_factory=lambda: ["image"])
    # label value -> name, 0 = background; every site's manifest must declare these
    # (no default entries: dicts merge key by key, so defaults would leak into every data/ file)
    labels: dict[int, str] = field(default_factory=dict)
    # what the label values mean: exclusive (default; Dice per label), or a tumour
    # convention whose nested regions are evaluated too (WT/TC/ET Dice and HD95):
    # brats2021 (1 NCR/NET, 2 ED, 4 ET), brats2023 (1 NCR, 2 ED, 3 ET), msd_task01
    # (1 oedema, 2 non-enhancing, 3 enhancing); fl_imaging/data/regions.py
    label_scheme: str = "exclusive"
    # target voxel spacing in mm (None: keep each scan's own)
    spacing: list[float] | None = None
    # training patch / padded volume size in voxels
    patch_size: list[int] = field(default_factory=lambda: [32, 32, 32])
    # per-image intensity percentiles clipped to [0, 1]
    intensity_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    # spatial axes (after RAS reorientation) that random flips may flip
    flip_axes: list[int] = field(default_factory=lambda: [0])
    # random flips and intensity changes of training patches; false: none (the random
    # patch stays). Each is a per-patient transform, so DP-SGD's guarantee is unchanged
    augment: bool = True
    # validation fraction for manifests that mark no validation cases
    val_fraction: float = 0.2
    # where a site keeps its preprocessed cases between rounds: "disk" (MONAI
    # PersistentDataset in the site's state folder: NIfTI files are read and resampled
    # once, not every round) or "memory" (re-read every round, nothing written)
    cache: str = "disk"
    # with cache=disk: cases read from the disk cache also stay in the memory of the
    # process that trains, up to this many MB per process (a simulation worker keeps
    # them across rounds; a deployed ClientApp process lives for one message); 0: off
    memory_cache_mb: int = 1024
    # dtype of the cached preprocessed images: float16 (labels uint8; a third of float32's
    # bytes, intensities scaled to [0, 1] kept to ~5e-4) or float32
    cache_dtype: str = "float16"


@dataclass
class TrainConfig:
    """Local training of one site in one round."""

    local_epochs: int = 1
    # cases per step; 0: all of the site's training cases (one step per epoch; under
    # DP-SGD a Poisson sampling rate of 1, the least noise per step)
    batch_size: int = 2
    lr: float = 1e-3
    # "constant", or "cosine": lr in round 1, decaying over the run's rounds to about
    # lr * 2.5 % in the last of 10 (fl_imaging.ml.training.round_lr)
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    # adam or sgd (with momentum); DP-SGD sites learn with sgd (docs/RESULTS.md)
    optimizer: str = "adam"
    momentum: float = 0.9
    # end each local round with the exponential moving average of the weights over
    # its steps (e.g. 0.9); null: the last weights
    ema_decay: float | None = None
    # training loss weight of each class, in data.labels order (background first), in
    # both the Dice and the cross-entropy term; null: all 1
    class_weights: list[float] | None = None
    threads: int = 1
    # site progress lines: "epoch" (one per local epoch) or "round" (one per round,
    # quieter with many sites)
    progress: str = "epoch"
    # where a site trains: "auto" (its CUDA GPU when it has one, else CPU), "cpu",
    # "cuda" or "cuda:<i>"; in simulation federation.simulation.num_gpus_per_site
    # shares one GPU between virtual sites (e.g. 0.25: four per GPU)
    device: str = "auto"
    # mixed precision on the site's device: off, bf16 (autocast; DP-SGD clips and
    # noises in float32) or fp16 (autocast with a loss scaler; CUDA and sites without
    # DP-SGD only: the scaler would scale per-patient gradients before clipping)
    amp: str = "off"
    # CUDA only: let cuDNN pick the fastest convolution algorithms for the patch size
    cudnn_benchmark: bool = False
    # model and batches in torch.channels_last_3d memory layout (NDHWC)
    channels_last: bool = False


@dataclass
class StrategyConfig:
    """Server-side aggregation."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    # FedProx: weight of the proximal term (mu/2)||w - w_global||^2 in each site's loss
    proximal_mu: float = 0.0
    # reject an update farther from the global model than this many times the round's
    # median distance (null: no norm screening; malformed or non-finite updates are
    # always rejected)
    screen_norm_factor: float | None = 10.0
    # FedBN: each site keeps its normalisation layers (weights and statistics) local
    local_norm: bool = False
    # after the last round: each site fine-tunes the global model this many local epochs,
    # then every model (global and fine-tuned) is evaluated at every site (0: skip)
    cross_site_epochs: int = 1
    # one message per round: each site evaluates the global model it receives at the start
    # of its train step and replies with both; the last model gets one evaluate message.
    # Halves the messages of a round (a deployment round: 4.7 s instead of 10.7 s of
    # overhead); false: a separate evaluate message after every round
    evaluate_in_train: bool = True
    # the model the run evaluates, checkpoints and delivers: the exponential moving average
    # of the global models over rounds (average = decay * average + (1 - decay) * model,
    # from the first aggregate on); training goes on from the plain aggregate.
    # Post-processing on the server: no privacy cost. With it, every round evaluates the
    # average in its own message (evaluate_in_train does not apply). null: off
    global_ema_decay: float | None = None
    # further keyword arguments of the Flower strategy (e.g. eta, beta_1 for fedadam,
    # server_momentum for fedavgm, beta for fedtrimmedavg, num_malicious_nodes for krum)
    params: dict[str, Any] = field(default_factory=dict)
    connect_timeout: float = 120.0
    round_timeout: float = 3600.0
    # a site that failed (its data, its config, a crash) and did not recover by the end
    # makes the run "finished_with_failures" and fail (non-zero exit); true: the run
    # still reports it, but counts as completed (outputs/latest moves to it)
    allow_site_failures: bool = False


@dataclass
class CompressionConfig:
    """How sites encode their update (trained - received global weights) for the server.

    The server decodes every update back into full weights before screening and
    aggregation (``fl_imaging.updates.compression``); the global model goes down uncompressed.
    """

    # none | fp16 | int8 | topk
    codec: str = "none"
    # int8: blockwise (one float32 scale per block_size elements) or per_tensor
    scales: str = "blockwise"
    block_size: int = 256
    # topk: fraction of each tensor's entries sent (largest magnitude), in (0, 1]
    topk_fraction: float = 0.1
    # keep what was not sent at the site (context.state) and add it to the next update
    error_feedback: bool = False


@dataclass
class SecureAggregationConfig:
    """Secure aggregation of the training updates (Flower's SecAgg+).

    Each site weights its update (trained - global weights) by num_examples /
    max_weight, clips it to [-clipping_range, clipping_range], quantises it to
    2**quantization_bits levels and masks it; the server unmasks only the sum
    (``fl_imaging.secagg.server``).
    """

    # none | secaggplus
    name: str = "none"
    # sites each site secret-shares its keys with, itself included (odd if below the
    # sites per round); null: every site trained in the round
    num_shares: int | None = None
    # shares needed to rebuild a dropped site's keys; up to num_shares - threshold
    # neighbours may drop out. null: a majority of num_shares
    reconstruction_threshold: int | None = None
    # bound on each weighted update entry before quantisation (larger ones are clipped)
    clipping_range: float = 1.0
    # quantisation levels 2**bits over [-clipping_range, clipping_range]
    quantization_bits: int = 24
    # sites weight their update by num_examples / max_weight: set it to about the largest
    # site's training cases (larger: coarser quantisation; smaller: Flower warns)
    max_weight: float = 100.0


@dataclass
class PathsConfig:
    """Where run folders and site state go; relative paths resolve against ``root``."""

    root: str = "."
    outputs: str = "outputs"
    state: str = "state"


@dataclass
class RunPlan:
    """The validated configuration of one federated run."""

    name: str = "run"
    rounds: int = 5
    seed: int = 0
    # continue a stopped run: "latest" or a run folder; its model, data and sites must
    # match this configuration (rounds may grow)
    resume: str | None = None
    federation: FederationConfig = field(default_factory=FederationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def resolve_path(self, path: str | Path) -> Path:
        """Absolute version of ``path``: relative paths resolve against ``paths.root``."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else (Path(self.paths.root).expanduser() / path).resolve()

    def site(self, name: str) -> SiteConfig:
        """The site called ``name``; :class:`ConfigError` listing the known sites otherwise."""
        for site in self.federation.sites:
            if site.name == name:
                return site
        known = ", ".join(s.name for s in self.federation.sites)
        raise ConfigError(f"unknown site {name!r}; federation.sites has: {known}")

    def site_data_root(self, site: SiteConfig) -> Path | None:
        """The folder ``site``'s manifest paths resolve against (None: the manifest's own)."""
        root = site.data_root or self.federation.data_root
        return self.resolve_path(root) if root else None

    def site_state_dir(self, site: SiteConfig) -> Path:
        """The site's own state folder (created by whoever writes to it)."""
        if site.state_dir:
            return self.resolve_path(site.state_dir)
        return self.resolve_path(self.paths.state) / site.name

    @property
    def site_names(self) -> list[str]:
        """Site names in federation order."""
        return [s.name for s in self.federation.sites]


SCHEMA_NAME = "fl_imaging_schema"


def register_schema() -> None:
    """Store :class:`RunPlan` in Hydra's ConfigStore as ``fl_imaging_schema``.

    ``conf/config.yaml`` lists it first in its defaults, so Hydra composes onto the
    typed schema: a misspelt key fails at composition, and every schema key can be
    overridden without ``+``.
    """
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunPlan)


def conf_dir() -> Path:
    """The ``conf/`` folder: ``$FL_IMAGING_CONF`` or the one beside the package.

    The package and ``conf/`` sit side by side both in a source checkout and in the
    Flower app bundle (FAB), which carries the YAML files.
    """
    env = os.environ.get(CONF_DIR_ENV)
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"no config.yaml in {path}; set {CONF_DIR_ENV} to the project's conf/ folder"
        )
    return path


def split_experiment(items: Sequence[str], default: str = "demo") -> tuple[str, list[str]]:
    """Separate ``experiment=NAME`` from the other Hydra overrides of a command line."""
    experiment, overrides = default, []
    for item in items:
        if item.startswith("experiment="):
            experiment = item.split("=", 1)[1]
        else:
            overrides.append(item)
    return experiment, overrides


def with_root(overrides: Sequence[str], root: Path) -> list[str]:
    """``overrides`` plus ``paths.root=<root>`` unless they set ``paths.root`` themselves."""
    items = list(overrides)
    if not any(o.startswith("paths.root=") for o in items):
        items.append(f"paths.root={root}")
    return items


def split_overrides(overrides: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Turn a Hydra override string (``"a=1 b='x y'"``) or list into a list of overrides."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return shlex.split(overrides)
    return list(overrides)


# characters a POSIX shell word (and shlex.split) keeps as they are without quoting
_SHELL_SAFE = frozenset("@%+=:,./-_")


def run_config_string(experiment: str, overrides: list[str] | tuple[str, ...]) -> str:
    """The ``--run-config`` of ``flwr run`` that carries ``experiment`` and ``overrides``.

    Flower parses ``key=value`` pairs with a pattern in which a quoted value cannot hold
    its own quote character, escaped or not: an override such as ``name="a b"`` inside a
    double-quoted value would end the value early and make ``flwr run`` fail before the
    run starts. Every character outside letters, digits and ``@%+=:,./-_`` is therefore
    backslash-escaped (which :func:`split_overrides` undoes), and the value is sent in the
    quote that it does not contain.

    Raises:
        ConfigError: the overrides hold both quote characters (Flower cannot carry that),
            a line break or another control character, or the experiment name is not a
            plain word.
    """
    if any(not (c.isalnum() or c in _SHELL_SAFE) for c in experiment):
        raise ConfigError(f"experiment {experiment!r}: letters, digits and @%+=:,./-_ only")
    words = []
    for item in overrides:
        if any(ord(c) < 32 or ord(c) == 127 for c in item):
            raise ConfigError(f"override {item!r}: holds a line break or control character")
        words.append("".join(c if c.isalnum() or c in _SHELL_SAFE else "\\" + c for c in item))
    joined = " ".join(words)
    if "'" not in joined:  # a TOML literal string: its backslashes stay as they are
        return f"experiment='{experiment}' overrides='{joined}'"
    if '"' not in joined:  # a TOML basic string: its backslashes must be doubled
        escaped = joined.replace("\\", "\\\\")
        return f'experiment="{experiment}" overrides="{escaped}"'
    raise ConfigError(
        "the overrides hold both ' and \" quotes, which Flower's --run-config cannot carry "
        "in one value; quote every string with the same kind: "
        + " ".join(i for i in overrides if "'" in i or '"' in i)
    )


@lru_cache(maxsize=32)
def _compose_cached(experiment: str, overrides: tuple[str, ...], conf: str) -> DictConfig:
    # Hydra keeps global state; the context manager clears it again, so repeated
    # calls in long-lived simulation workers are safe. Cached: a compose costs ~0.1 s.
    register_schema()
    args = list(overrides)
    if experiment:
        args = [f"experiment={experiment}", *args]
    try:
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=args)
    except (HydraException, OmegaConfBaseException, AttributeError) as exc:
        # OmegaConf reports some bad merges as AttributeError
        raise ConfigError(f"cannot compose config (experiment={experiment!r}): {exc}") from exc


def compose_dictconfig(
    experiment: str | None = None, overrides: str | list[str] | tuple[str, ...] | None = None
) -> DictConfig:
    """Compose ``conf/`` with an experiment and overrides; return the raw DictConfig."""
    cfg = _compose_cached(experiment or "", tuple(split_overrides(overrides)), str(conf_dir()))
    return cfg.copy()


def to_plan(cfg: DictConfig, *, check: bool = True) -> RunPlan:
    """Merge a composed config into the typed schema and (with ``check``) validate it.

    Raises:
        ConfigError: unknown or mistyped keys, or values that cannot work; the
            message names the key (and the site).
    """
    unknown = unknown_keys(OmegaConf.to_container(cfg, resolve=False), RunPlan)
    if unknown:
        raise ConfigError(
            "invalid configuration: unknown keys (misspelt? a '+' override adds a key the "
            "schema does not have, which would otherwise be dropped silently): "
            + ", ".join(unknown)
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunPlan), cfg)
        plan = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    if not isinstance(plan, RunPlan):  # pragma: no cover - OmegaConf contract
        raise ConfigError("configuration did not produce a RunPlan")
    problems = validate(plan) if check else []
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return plan


def unknown_keys(node: Any, schema: type, path: str = "") -> list[str]:
    """Dotted paths of keys in ``node`` (plain containers) that ``schema`` does not define.

    Walks nested dataclasses and lists of dataclasses (``federation.sites[*]``), where
    OmegaConf's merge of a list would otherwise drop an unknown key without a word.
    """
    if not (dataclasses.is_dataclass(schema) and isinstance(node, dict)):
        return []
    hints = typing.get_type_hints(schema)
    found = []
    for key, value in node.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in hints:
            found.append(where)
            continue
        hint = hints[key]
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is list and inner and isinstance(value, list):
            for i, item in enumerate(value):
                found += unknown_keys(item, inner[0], f"{where}[{i}]")
        else:
            target = hint if dataclasses.is_dataclass(hint) else (inner[0] if inner else None)
            if target is not None and dataclasses.is_dataclass(target):
                found += unknown_keys(value, target, where)
    return found


def compose(
    experiment: str | None = None, overrides: str | list[str] | tuple[str, ...] | None = None
) -> RunPlan:
    """Compose and validate the run plan for ``experiment`` plus Hydra ``overrides``."""
    return to_plan(compose_dictconfig(experiment, overrides))


def validate(plan: RunPlan) -> list[str]:
    """Return every problem of ``plan`` (empty when it is usable), section by section."""
    return [
        *_run_problems(plan),
        *_model_problems(plan),
        *_data_problems(plan),
        *_train_problems(plan),
        *_site_problems(plan),
        *_strategy_problems(plan),
        *_privacy_problems(plan),
        *_compression_problems(plan.compression),
        *secure_aggregation_problems(plan),
    ]


def _run_problems(plan: RunPlan) -> list[str]:
    """``rounds`` and the list of sites."""
    problems: list[str] = []
    if plan.rounds < 1:
        problems.append(f"rounds must be >= 1, got {plan.rounds}")
    sites = plan.federation.sites
    if not sites:
        problems.append("federation.sites is empty: configure at least one site")
    names = [s.name for s in sites]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"federation.sites: site name {dup!r} appears more than once")
    return problems


def _model_problems(plan: RunPlan) -> list[str]:
    """``model.*``: known names, channels against strides, group sizes."""
    problems: list[str] = []
    if plan.model.name not in KNOWN_MODELS:
        problems.append(f"model.name {plan.model.name!r} is unknown; choose one of {KNOWN_MODELS}")
    if plan.model.norm not in KNOWN_NORMS:
        problems.append(f"model.norm {plan.model.norm!r} is unknown; choose one of {KNOWN_NORMS}")
    if plan.model.act not in KNOWN_ACTS:
        problems.append(f"model.act {plan.model.act!r} is unknown; choose one of {KNOWN_ACTS}")
    if plan.model.name == "features":
        if plan.model.strides or min(plan.model.channels, default=1) < 1:
            problems.append(
                f"model.name=features: model.strides must be [] (got {plan.model.strides}) "
                f"and model.channels positive hidden widths (got {plan.model.channels})"
            )
        if min([*plan.model.scales, *plan.model.hessian_scales], default=1) <= 0:
            problems.append(
                f"model.scales {plan.model.scales} and model.hessian_scales "
                f"{plan.model.hessian_scales} must be > 0 (voxels)"
            )
    elif len(plan.model.channels) != len(plan.model.strides) + 1:
        problems.append(
            f"model.channels ({len(plan.model.channels)} entries) must have one more entry "
            f"than model.strides ({len(plan.model.strides)})"
        )
    widths = [*plan.model.channels, len(plan.data.labels)]  # MONAI's UNet norms its output too
    if plan.model.norm == "group" and (
        plan.model.num_groups < 1 or any(c % plan.model.num_groups for c in widths)
    ):
        problems.append(
            f"model.num_groups={plan.model.num_groups} must divide every entry of "
            f"model.channels {plan.model.channels} and the {len(plan.data.labels)} classes "
            f"(model.norm=group)"
        )
    return problems


def _data_problems(plan: RunPlan) -> list[str]:
    """``data.*``: patch size against the model, labels, spacing, caching."""
    problems: list[str] = []
    if len(plan.data.patch_size) != 3 or min(plan.data.patch_size) < 1:
        problems.append(f"data.patch_size must be 3 positive sizes, got {plan.data.patch_size}")
    else:
        factor = 1
        for s in plan.model.strides:
            factor *= s
        bad = [p for p in plan.data.patch_size if p % factor]
        if bad:
            problems.append(
                f"data.patch_size {plan.data.patch_size} must be divisible by {factor} "
                f"(the product of model.strides)"
            )
    if not plan.data.modalities:
        problems.append("data.modalities must list at least one input channel")
    if 0 not in plan.data.labels or len(plan.data.labels) < 2 or min(plan.data.labels) < 0:
        problems.append(
            f"data.labels must map 0 (background) and at least one foreground label, "
            f"got {dict(plan.data.labels)}"
        )
    problems += scheme_problems(plan.data.label_scheme, plan.data.labels)
    if plan.data.spacing is not None and (
        len(plan.data.spacing) != 3 or min(plan.data.spacing) <= 0
    ):
        problems.append(
            f"data.spacing must be 3 positive sizes in mm or null, got {plan.data.spacing}"
        )
    low, high = [*plan.data.intensity_percentiles, None, None][:2]
    if low is None or high is None or not 0 <= low < high <= 100:
        problems.append(
            f"data.intensity_percentiles must be [low, high] with 0 <= low < high <= 100, "
            f"got {plan.data.intensity_percentiles}"
        )
    if any(a not in (0, 1, 2) for a in plan.data.flip_axes):
        problems.append(f"data.flip_axes must be spatial axes 0, 1, 2; got {plan.data.flip_axes}")
    if not 0 <= plan.data.val_fraction < 1:
        problems.append(f"data.val_fraction must be in [0, 1), got {plan.data.val_fraction}")
    if plan.data.cache not in ("disk", "memory"):
        problems.append(f"data.cache must be 'disk' or 'memory', got {plan.data.cache!r}")
    if plan.data.cache_dtype not in ("float16", "float32"):
        problems.append(
            f"data.cache_dtype must be 'float16' or 'float32', got {plan.data.cache_dtype!r}"
        )
    if plan.data.memory_cache_mb < 0:
        problems.append(f"data.memory_cache_mb must be >= 0, got {plan.data.memory_cache_mb}")
    return problems


def _train_problems(plan: RunPlan) -> list[str]:
    """``train.*``: epochs, batch size, optimiser, device."""
    problems: list[str] = []
    if plan.train.local_epochs < 1:
        problems.append(f"train.local_epochs must be >= 1, got {plan.train.local_epochs}")
    if plan.train.batch_size < 0:
        problems.append(
            f"train.batch_size must be >= 1, or 0 for all training cases, got "
            f"{plan.train.batch_size}"
        )
    if plan.train.lr <= 0:
        problems.append(f"train.lr must be > 0, got {plan.train.lr}")
    if plan.train.optimizer not in KNOWN_OPTIMIZERS:
        problems.append(
            f"train.optimizer {plan.train.optimizer!r} is unknown; choose one of {KNOWN_OPTIMIZERS}"
        )
    if plan.train.lr_schedule not in KNOWN_LR_SCHEDULES:
        problems.append(
            f"train.lr_schedule {plan.train.lr_schedule!r} is unknown; choose one of "
            f"{KNOWN_LR_SCHEDULES}"
        )
    if not 0 <= plan.train.momentum < 1:
        problems.append(f"train.momentum must be in [0, 1), got {plan.train.momentum}")
    if plan.train.ema_decay is not None and not 0 < plan.train.ema_decay < 1:
        problems.append(f"train.ema_decay must be in (0, 1) or null, got {plan.train.ema_decay}")
    problems += _class_weight_problems(plan.train.class_weights, plan.data.labels)
    if plan.train.progress not in ("epoch", "round"):
        problems.append(f"train.progress must be 'epoch' or 'round', got {plan.train.progress!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", plan.train.device):
        problems.append(
            f"train.device must be auto, cpu, cuda or cuda:<index>, got {plan.train.device!r}"
        )
    if plan.train.threads < 0:
        problems.append(f"train.threads must be >= 0, got {plan.train.threads}")
    if plan.train.amp not in KNOWN_AMP:
        problems.append(f"train.amp {plan.train.amp!r} is unknown; choose one of {KNOWN_AMP}")
    if plan.train.amp == "fp16" and plan.train.device == "cpu":
        problems.append("train.amp=fp16 needs a CUDA device (train.device=cpu); use bf16 on CPU")
    return problems


def _class_weight_problems(weights: Sequence[float] | None, labels: dict[int, str]) -> list[str]:
    """``train.class_weights``: one non-negative weight per class, some foreground > 0."""
    if weights is None:
        return []
    if len(weights) != len(labels):
        return [
            f"train.class_weights has {len(weights)} weights but data.labels has "
            f"{len(labels)} classes ({', '.join(labels[k] for k in sorted(labels))}); give "
            f"one weight per class, background first"
        ]
    if any(not (math.isfinite(w) and w >= 0) for w in weights) or not any(
        w > 0 for w in weights[1:]
    ):
        return [
            f"train.class_weights must be finite and >= 0 with a foreground weight > 0, got "
            f"{list(weights)}"
        ]
    return []


def _strategy_problems(plan: RunPlan) -> list[str]:
    """``strategy.*``: known strategy, fractions, ``min_sites``, the global average, FedProx."""
    problems: list[str] = []
    sites = plan.federation.sites
    if plan.strategy.name not in KNOWN_STRATEGIES:
        problems.append(
            f"strategy.name {plan.strategy.name!r} is unknown; choose one of {KNOWN_STRATEGIES}"
        )
    for key in ("fraction_train", "fraction_evaluate"):
        value = getattr(plan.strategy, key)
        if not 0 < value <= 1:
            problems.append(f"strategy.{key} must be in (0, 1], got {value}")
    if not 1 <= plan.strategy.min_sites <= max(len(sites), 1):
        problems.append(
            f"strategy.min_sites must be between 1 and the number of sites ({len(sites)}), "
            f"got {plan.strategy.min_sites}"
        )
    decay = plan.strategy.global_ema_decay
    if decay is not None and not 0 < decay < 1:
        problems.append(f"strategy.global_ema_decay must be in (0, 1) or null, got {decay}")
    if plan.strategy.name == "fedprox" and plan.strategy.proximal_mu <= 0:
        problems.append(
            f"strategy.proximal_mu must be > 0 for fedprox, got {plan.strategy.proximal_mu}"
        )
    if plan.strategy.cross_site_epochs < 0:
        problems.append(
            f"strategy.cross_site_epochs must be >= 0, got {plan.strategy.cross_site_epochs}"
        )
    factor = plan.strategy.screen_norm_factor
    if factor is not None and factor <= 1:
        problems.append(f"strategy.screen_norm_factor must be > 1 or null, got {factor}")
    if plan.strategy.proximal_mu < 0:
        problems.append(f"strategy.proximal_mu must be >= 0, got {plan.strategy.proximal_mu}")
    return problems


def _privacy_problems(plan: RunPlan) -> list[str]:
    """``privacy.*`` and what private sites rule out (FedProx, batch norm)."""
    problems: list[str] = []
    private = [s.name for s in plan.federation.sites if s.privacy.epsilon is not None]
    if private and plan.strategy.proximal_mu > 0:
        problems.append(
            f"strategy.proximal_mu={plan.strategy.proximal_mu} with private sites {private}: "
            f"DP-SGD clips per-sample gradients, which cannot include FedProx's proximal "
            f"term; use strategy=fedavg for private sites"
        )
    if private and plan.train.amp == "fp16":
        problems.append(
            f"train.amp=fp16 with private sites {private}: its loss scaler multiplies every "
            f"per-patient gradient before Opacus clips it, so the clipping norm and the noise "
            f"would not be what the accountant assumes; use train.amp=bf16 (no scaler) or off"
        )
    if private and plan.model.norm == "batch":
        problems.append(
            f"model.norm=batch with private sites {private}: batch statistics mix patients, "
            f"which DP-SGD forbids; use model.norm=instance"
        )
    central = plan.privacy.central
    if central.noise_multiplier is not None and (
        central.noise_multiplier <= 0 or central.clipping_norm <= 0
    ):
        problems.append(
            "privacy.central.noise_multiplier and privacy.central.clipping_norm must be > 0 "
            f"(got {central.noise_multiplier}, {central.clipping_norm})"
        )
    if plan.privacy.accountant not in KNOWN_ACCOUNTANTS:
        problems.append(
            f"privacy.accountant {plan.privacy.accountant!r} is unknown; "
            f"choose one of {KNOWN_ACCOUNTANTS}"
        )
    if plan.privacy.grad_sample_mode not in KNOWN_GRAD_SAMPLE_MODES:
        problems.append(
            f"privacy.grad_sample_mode {plan.privacy.grad_sample_mode!r} is unknown; "
            f"choose one of {KNOWN_GRAD_SAMPLE_MODES}"
        )
    problems += budget_problems("privacy", None, plan.privacy.delta, plan.privacy.max_grad_norm)
    if plan.privacy.clipping not in ("flat", "per_layer"):
        problems.append(
            f"privacy.clipping must be flat or per_layer, got {plan.privacy.clipping!r}"
        )
    shares = {g.prefix: g.share for g in plan.privacy.clip_groups}
    if shares and plan.privacy.clipping != "flat":
        problems.append("privacy.clip_groups needs privacy.clipping=flat (groups of one norm)")
    if any(not 0 < v < 1 for v in shares.values()) or sum(v * v for v in shares.values()) >= 1:
        problems.append(
            f"privacy.clip_groups: each share must be in (0, 1) and their squares sum below 1 "
            f"(the weights in no group get the rest), got {shares}"
        )
    if plan.privacy.max_physical_batch < 0:
        problems.append(
            f"privacy.max_physical_batch must be >= 0, got {plan.privacy.max_physical_batch}"
        )
    if plan.privacy.lr is not None and not plan.privacy.lr > 0:
        problems.append(f"privacy.lr must be > 0 (or null: train.lr), got {plan.privacy.lr}")
    if plan.privacy.augmentations < 1:
        problems.append(f"privacy.augmentations must be >= 1, got {plan.privacy.augmentations}")
    if not plan.privacy.lock_timeout >= 0:
        problems.append(f"privacy.lock_timeout must be >= 0, got {plan.privacy.lock_timeout}")
    return problems


def _compression_problems(cfg: CompressionConfig) -> list[str]:
    from fl_imaging.updates.compression import CompressionError, codec_of

    try:
        codec_of(cfg)
    except CompressionError as exc:
        return [f"compression.{exc}"]
    if cfg.error_feedback and cfg.codec == "none":
        return [
            "compression.error_feedback=true does nothing with codec none (nothing is "
            "dropped); set compression.error_feedback=false or choose a lossy codec"
        ]
    return []


def _site_problems(plan: RunPlan) -> list[str]:
    problems: list[str] = []
    sites = plan.federation.sites
    sim = plan.federation.simulation
    if sim.num_supernodes is not None and sim.num_supernodes < len(sites):
        problems.append(
            f"federation.simulation.num_supernodes={sim.num_supernodes} but federation.sites "
            f"lists {len(sites)} sites: every site needs its own simulated node"
        )
    if sim.num_cpus_per_site <= 0:
        problems.append(
            f"federation.simulation.num_cpus_per_site must be > 0, got {sim.num_cpus_per_site}"
        )
    if not (
        sim.num_gpus_per_site == "auto"
        or (isinstance(sim.num_gpus_per_site, float | int) and sim.num_gpus_per_site >= 0)
    ):
        problems.append(
            "federation.simulation.num_gpus_per_site must be >= 0 (a share of one GPU, or "
            f"whole GPUs) or 'auto', got {sim.num_gpus_per_site!r}"
        )
    if not 0 < sim.gpu_memory_use <= 1:
        problems.append(
            f"federation.simulation.gpu_memory_use must be in (0, 1], got {sim.gpu_memory_use}"
        )
    for site in sites:
        key = f"federation.sites[{site.name}]"
        if not site.name or not all(c.isalnum() or c in "_-." for c in site.name):
            problems.append(
                f"{key}.name must be non-empty letters, digits, '_', '-' or '.' "
                f"(it names folders), got {site.name!r}"
            )
        if not site.manifest:
            problems.append(f"{key}.manifest is empty: give the site's manifest file")
        for name in ("local_epochs", "batch_size"):
            value = getattr(site, name)
            if value is not None and value < 1:
                problems.append(f"{key}.{name} must be >= 1, got {value}")
        budget = site.privacy
        if budget.epsilon is None:
            continue
        problems += budget_problems(
            f"{key}.privacy", budget.epsilon, budget.delta, budget.max_grad_norm
        )
    return problems + _site_key_problems(plan)


def _site_key_problems(plan: RunPlan) -> list[str]:
    keys = plan.federation.site_keys
    if not keys:
        return []
    names = plan.site_names
    problems = [
        f"federation.site_keys names {site!r}, which is not in federation.sites {names}"
        for site in keys
        if site not in names
    ]
    problems += [
        f"federation.site_keys has no key for site {site!r}: with site_keys set, a site "
        f"without one can never join (add `fl-imaging site fingerprint <its key>.pub`)"
        for site in names
        if site not in keys
    ]
    problems += [
        f"federation.site_keys.{site} must be 64 lowercase hex digits (SHA-256), got {fp!r}"
        for site, fp in keys.items()
        if not re.fullmatch(r"[0-9a-f]{64}", str(fp))
    ]
    owners: dict[str, str] = {}
    for site, fp in keys.items():
        if fp in owners:
            problems.append(
                f"federation.site_keys: {owners[fp]!r} and {site!r} have the same key; each "
                f"hospital needs its own"
            )
        owners[fp] = site
    return problems


def budget_problems(
    key: str, epsilon: float | None, delta: float | None, max_grad_norm: float | None
) -> list[str]:
    """What is wrong with a DP budget (``key`` names it in the messages).

    Epsilon must be a finite number > 0 (NaN and infinity would train without a bound),
    delta in (0, 1) and the clipping norm finite and > 0; None means "not set".
    """
    problems = []
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        problems.append(f"{key}.epsilon must be a finite number > 0, got {epsilon}")
    if delta is not None and not (math.isfinite(delta) and 0 < delta < 1):
        problems.append(f"{key}.delta must be in (0, 1), got {delta}")
    if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        problems.append(f"{key}.max_grad_norm must be a finite number > 0, got {max_grad_norm}")
    return problems


def plan_to_yaml(plan: RunPlan) -> str:
    """The resolved plan as YAML (what a run folder's ``config.yaml`` holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(plan))


def plan_to_dict(plan: RunPlan) -> dict[str, Any]:
    """The resolved plan as plain Python containers (for checkpoints and JSON)."""
    container = OmegaConf.to_container(OmegaConf.structured(plan), resolve=True)
    if not isinstance(container, dict):  # pragma: no cover - OmegaConf contract
        raise ConfigError("plan did not serialise to a mapping")
    return container
