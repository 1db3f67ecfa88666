"""Every key that crosses the Flower boundary, defined once.

Record and metric names follow Flower's defaults (``"arrays"``, ``"config"``,
``"num-examples"``) so Flower's strategies read them as they are.
"""

from enum import StrEnum


class RecordKey(StrEnum):
    """Keys of the records inside a message's ``RecordDict``."""

    ARRAYS = "arrays"
    CONFIG = "config"
    METRICS = "metrics"
    # ConfigRecord a site adds to each reply: its name (never any voxel data)
    SITE = "site"
    # ConfigRecord in a train reply (strategy.evaluate_in_train): the validation metrics
    # of the global model the site received, measured before it trained
    EVALUATION = "evaluation"
    # a training reply's encoded update (ArrayRecord of "<tensor>::<part>" arrays) and
    # its codec header (ConfigRecord, keys in CodecKey); the server decodes them into
    # full weights under ARRAYS before screening and aggregation
    UPDATE = "update"
    CODEC = "codec"
    # ConfigRecord of a train reply whose site refused the run (RefusalKey)
    REFUSAL = "refusal"


class RefusalKey(StrEnum):
    """Keys of the ``refusal`` ConfigRecord: why a site's own policy refused a run."""

    STATUS = "status"  # refused_by_policy
    REASON = "reason"


class RunConfigKey(StrEnum):
    """The Flower run config only selects the Hydra experiment."""

    EXPERIMENT = "experiment"
    OVERRIDES = "overrides"


class NodeConfigKey(StrEnum):
    """Keys of a SuperNode's ``node_config``: who am I, where is my data."""

    PARTITION_ID = "partition-id"  # simulation
    NUM_PARTITIONS = "num-partitions"  # simulation
    SITE = "site"  # deployment: the site's name in federation.sites
    DATA_ROOT = "data-root"  # deployment: overrides the configured data root
    STATE_DIR = "state-dir"  # deployment: overrides the configured state folder
    MANIFEST = "manifest"  # deployment: the site's own manifest file (overrides the configured)
    # the hospital's own privacy policy file (fl_imaging.privacy.policy); never sent
    PRIVACY_POLICY = "privacy-policy"


class ConfigKey(StrEnum):
    """Keys of the per-round ``ConfigRecord`` the server sends."""

    SERVER_ROUND = "server-round"  # injected by Flower's strategies
    PROXIMAL_MU = "proximal-mu"  # sent by Flower's FedProx
    # > 0: a short local fine-tune of this many epochs (cross-site evaluation), no FedProx
    FINETUNE_EPOCHS = "finetune-epochs"
    # 1: evaluate the received global model before training, reply with both (one
    # message per round instead of two: strategy.evaluate_in_train)
    EVALUATE_FIRST = "evaluate-first"


class CodecKey(StrEnum):
    """Keys of the ``codec`` ConfigRecord: how a site's update is encoded."""

    NAME = "name"  # none, fp16, int8, topk
    SCALES = "scales"  # int8: per_tensor or blockwise
    BLOCK_SIZE = "block-size"  # int8 blockwise: elements per scale
    TOPK_FRACTION = "topk-fraction"  # topk: fraction of each tensor's entries sent


class SiteKey(StrEnum):
    """Keys of the ``site`` ConfigRecord in a reply."""

    NAME = "name"


class MetricKey(StrEnum):
    """Keys of the ``MetricRecord`` in a reply."""

    NUM_EXAMPLES = "num-examples"
    LOSS = "loss"
    DICE_MEAN = "dice-mean"
    TRAIN_SECONDS = "train-seconds"
    # Unix time at which the site began its local training (start-up measurements)
    TRAIN_STARTED_AT = "train-started-at"
    STEPS = "steps"
    # peak GPU memory of the site's local training in MiB (torch.cuda.max_memory_allocated);
    # only from a site that trained on a GPU
    GPU_PEAK_MB = "gpu-peak-mb"
    # 1: the site trained and sent an update; 0: it did not (privacy budget exhausted, or
    # its own privacy policy refused the run: then REFUSED is 1 and the reply carries a
    # RecordKey.REFUSAL record with the reason)
    TRAINED = "trained"
    REFUSED = "refused"
    # cumulative DP epsilon of the site (inf: the site trains without DP)
    EPSILON_SPENT = "epsilon-spent"
    EPSILON_BUDGET = "epsilon-budget"

    @staticmethod
    def dice_of(label: int) -> str:
        """Metric key of the Dice of foreground label ``label`` (e.g. ``dice-1``)."""
        return f"dice-{label}"

    @staticmethod
    def region_dice_of(region: str) -> str:
        """Metric key of a region's Dice (``data.label_scheme``; e.g. ``dice-WT``)."""
        return f"dice-{region}"

    @staticmethod
    def region_hd95_of(region: str) -> str:
        """Metric key of a region's 95th-percentile Hausdorff distance in mm (``hd95-WT``)."""
        return f"hd95-{region}"
