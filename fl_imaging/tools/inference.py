"""Use a trained global model on new scans: NIfTI in, NIfTI label map out.

The scan goes through the same preprocessing as in training (RAS orientation,
optional resampling, percentile intensity scaling), MONAI sliding-window
inference with the training patch size, and ``Invertd`` back to the scan's own
voxel grid; the label map is written with the input's affine and header.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import AsDiscreted, Compose, Invertd
from omegaconf import OmegaConf

from fl_imaging.config import RunPlan, to_plan
from fl_imaging.data.loading import preprocessing
from fl_imaging.data.manifest import geometry_mismatch
from fl_imaging.data.regions import class_values
from fl_imaging.ml.models import build_model
from fl_imaging.ml.training import whole_volume_logits
from fl_imaging.outputs.reporting import CheckpointReadError, load_checkpoint, read_summary

logger = logging.getLogger(__name__)
_NIFTI = (".nii.gz", ".nii")


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match its own configuration."""


@dataclass(frozen=True)
class Predictor:
    """A trained model with the run plan it was trained under."""

    plan: RunPlan
    model: torch.nn.Module
    labels: dict[int, str]
    modalities: list[str]


def untrained_reason(checkpoint: Path, ckpt: dict[str, Any]) -> str | None:
    """Why a checkpoint should not be used for predictions (None: it is a trained model).

    A round-0 checkpoint is the initial, untrained model; a checkpoint of a run whose
    ``summary.json`` says it failed, is still running or lost sites may be partial.
    """
    if int(ckpt.get("round", -1)) == 0:
        return f"{checkpoint} is the round-0 model: it was never trained"
    status = read_summary(checkpoint.parent.parent).get("status")
    if status in ("failed", "running", "finished_with_failures"):
        return f"{checkpoint} comes from a run whose summary.json says status {status!r}"
    return None


def load_predictor(checkpoint: Path, *, allow_untrained: bool = False) -> Predictor:
    """Load ``checkpoints/best.pt`` (or ``last.pt``) of a run folder.

    Args:
        checkpoint: the checkpoint file.
        allow_untrained: accept a round-0 checkpoint or one of a failed run (logged).

    Raises:
        CheckpointError: not a checkpoint of this app, its weights do not fit the
            network its stored configuration describes, or (without
            ``allow_untrained``) it is untrained or from a failed run.
    """
    try:
        ckpt: dict[str, Any] = load_checkpoint(checkpoint)
    except CheckpointReadError as exc:
        raise CheckpointError(str(exc)) from exc
    missing = {"state_dict", "config", "labels", "modalities"} - set(ckpt)
    if missing:
        raise CheckpointError(
            f"{checkpoint}: not an fl-imaging checkpoint (missing {sorted(missing)})"
        )
    reason = untrained_reason(checkpoint, ckpt)
    if reason and not allow_untrained:
        raise CheckpointError(
            f"{reason}; predictions from it would look valid and be wrong. Use the "
            f"checkpoint of a completed run (outputs/latest), or pass --allow-untrained"
        )
    if reason:
        logger.warning("%s (used anyway: --allow-untrained)", reason)
    plan = to_plan(OmegaConf.create(ckpt["config"]), check=False)
    labels = {int(k): str(v) for k, v in ckpt["labels"].items()}
    modalities = [str(m) for m in ckpt["modalities"]]
    model = build_model(plan.model, in_channels=len(modalities), out_channels=len(labels))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint}: weights do not match the model its config describes "
            f"({plan.model}): {str(exc).splitlines()[0]}"
        ) from exc
    model.eval()
    return Predictor(plan, model, labels, modalities)


def _channels(path: Path) -> tuple[int, nib.Nifti1Image]:
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad files
        raise ValueError(f"{path}: not a readable NIfTI ({type(exc).__name__}: {exc})") from exc
    shape = img.shape
    if len(shape) == 3:
        return 1, img
    if len(shape) == 4:
        return int(shape[3]), img
    raise ValueError(f"{path}: expected a 3D scan or a 4D scan with channels last, got {shape}")


def _per_modality(images: Sequence[Path], modalities: Sequence[str]) -> nib.Nifti1Image:
    """Check one case's per-modality files (3D, one grid, one per modality); the first."""
    if len(images) != len(modalities):
        raise ValueError(
            f"{len(images)} files given but the model expects {len(modalities)} modalities "
            f"({', '.join(modalities)}): one 3D file per modality, in that order"
        )
    loaded = []
    for path in images:
        channels, img = _channels(path)
        if channels != 1:
            raise ValueError(f"{path}: a per-modality file must be 3D, has shape {img.shape}")
        loaded.append((path, img))
    first_path, first = loaded[0]
    for path, img in loaded[1:]:
        problem = (
            f"shapes {first.shape} vs {img.shape}"
            if img.shape != first.shape
            else geometry_mismatch(first, img)
        )
        if problem:
            raise ValueError(
                f"{first_path} and {path} are not on one voxel grid ({problem}); resample "
                f"the modalities onto one grid"
            )
    return first


@torch.no_grad()
def predict_file(predictor: Predictor, image: Path | Sequence[Path], output: Path) -> np.ndarray:
    """Segment one scan and write its label map; return the label array (input grid).

    Args:
        predictor: the loaded model.
        image: one file (3D, or 4D with the modalities as channels last), or one 3D file
            per modality in the model's modality order (the output takes the first's grid).
        output: the label map to write.

    Raises:
        ValueError: a scan is unreadable, has another number of channels than the
            model's modalities, or per-modality files are not on one grid.
    """
    files = [image] if isinstance(image, Path) else list(image)
    if len(files) > 1:
        img = _per_modality(files, predictor.modalities)
    else:
        channels, img = _channels(files[0])
        if channels != len(predictor.modalities):
            raise ValueError(
                f"{files[0]}: has {channels} channel(s) but the model expects "
                f"{len(predictor.modalities)} ({', '.join(predictor.modalities)}); give one "
                f"4D file with channels last in that order, or one 3D file per modality"
            )
    image = files[0]
    plan = predictor.plan
    pre = Compose(preprocessing(plan.data, keys=("image",), track_meta=True))
    data = pre({"image": [str(f) for f in files] if len(files) > 1 else str(files[0])})
    logits = whole_volume_logits(predictor.model, data["image"][None], plan.data.patch_size)
    data["pred"] = logits[0]
    post = Compose(
        [
            AsDiscreted(keys="pred", argmax=True),
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True),
        ]
    )
    pred = post(data)["pred"]
    classes = np.asarray(pred[0].cpu().numpy()).round().astype(np.int64)
    # training classes back to the label values (BraTS 2021: class 3 is label 4)
    labels = np.asarray(class_values(predictor.labels), dtype=np.uint8)[classes]
    if labels.shape != tuple(img.shape[:3]):
        raise RuntimeError(f"{image}: prediction shape {labels.shape} != scan {img.shape[:3]}")
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(labels, img.affine, header)
    out.set_qform(img.get_qform(), code=int(img.header["qform_code"]))
    out.set_sform(img.get_sform(), code=int(img.header["sform_code"]))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{''.join(_suffix(output))}")
    nib.save(out, str(tmp))
    tmp.replace(output)
    return labels


def _suffix(path: Path) -> str:
    return next((s for s in _NIFTI if path.name.endswith(s)), ".nii.gz")


def dice_per_label(pred: np.ndarray, label: np.ndarray, labels: dict[int, str]) -> dict[str, float]:
    """MONAI Dice of each foreground label between two integer label maps of one shape.

    A label absent from both maps gets NaN (MONAI's ``ignore_empty``).
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} != label shape {label.shape}")
    num_classes = max(labels) + 1
    # MONAI one-hot of [1, 1, X, Y, Z] label maps -> [1, C, X, Y, Z]
    p = one_hot(torch.as_tensor(pred, dtype=torch.long)[None, None], num_classes, dim=1)
    y = one_hot(torch.as_tensor(label, dtype=torch.long)[None, None], num_classes, dim=1)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    values = metric(y_pred=p.float(), y=y.float())[0].tolist()
    return {
        labels[k]: float(v)
        for k, v in zip(range(1, num_classes), values, strict=True)
        if k in labels
    }


def scans_in(path: Path) -> list[Path]:
    """One NIfTI file, or every NIfTI file in a folder (sorted)."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.endswith(_NIFTI))
        if not found:
            raise ValueError(f"{path}: no .nii or .nii.gz files")
        return found
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    return [path]
