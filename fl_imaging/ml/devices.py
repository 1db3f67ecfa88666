"""Where and how a site computes: its device, mixed precision and memory layout.

``train.device`` picks the device (``auto``: the site's CUDA GPU when it has one),
``train.amp`` the precision of the forward pass (``bf16`` or ``fp16`` autocast; the
weights, the optimiser and, under DP-SGD, the clipping and the noise stay float32),
``train.channels_last`` the ``channels_last_3d`` layout and ``train.cudnn_benchmark``
cuDNN's algorithm search. Nothing here falls back silently: a site asked for a GPU it
does not have, or for fp16 on a CPU, gets an error naming what to change.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

# torch dtypes of train.amp's autocast
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def assigned_gpus() -> str:
    """The GPU ids this process was given through ``CUDA_VISIBLE_DEVICES`` ('' for none).

    The simulation engine (Ray) sets it for a virtual site that holds a GPU share;
    ``-1`` (a common way to hide every GPU) counts as none.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return "" if visible in ("", "-1") else visible


def select_device(name: str) -> torch.device:
    """The torch device ``train.device`` names: ``auto`` (CUDA when present), ``cpu``, ``cuda[:i]``.

    Raises:
        ValueError: a CUDA device is asked for on a machine without one, or ``auto`` in
            a process that was given GPUs (``CUDA_VISIBLE_DEVICES``) torch cannot use
            (a CPU-only torch build, a missing driver): never a silent CPU run.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        gpus = assigned_gpus()
        if gpus:
            raise ValueError(
                f"this process was given GPU {gpus} (CUDA_VISIBLE_DEVICES) but torch "
                f"{torch.__version__} sees no CUDA device (a CPU-only torch build or no "
                f"driver?); fix the install, or set train.device=cpu to train on the CPU"
            )
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but this machine has no CUDA device; use auto")
    return device


def check_amp(amp: str, device: torch.device) -> None:
    """Refuse a ``train.amp`` the device cannot run (fp16 autocast needs CUDA here).

    Raises:
        ValueError: an unknown ``amp``, or ``fp16`` on a device other than CUDA.
    """
    if amp != "off" and amp not in AMP_DTYPES:
        raise ValueError(f"train.amp {amp!r} is unknown; choose off, bf16 or fp16")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(
            f"train.amp=fp16 needs a CUDA device, this site computes on {device}; "
            f"use train.amp=bf16 or off"
        )


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` for ``train.amp`` on ``device`` (a no-op context for ``off``)."""
    if amp == "off":
        return contextlib.nullcontext()
    check_amp(amp, device)
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def new_grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (its small exponent range underflows gradients); else None."""
    if amp != "fp16":
        return None
    check_amp(amp, device)
    return torch.amp.GradScaler(device.type)


def place_model(
    model: nn.Module, device: torch.device, *, channels_last: bool = False
) -> nn.Module:
    """``model`` on ``device``, in ``channels_last_3d`` layout when asked (in place)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def place_batch(
    tensor: torch.Tensor, device: torch.device, *, channels_last: bool = False
) -> torch.Tensor:
    """A batch ``[B, C, X, Y, Z]`` on ``device`` (``channels_last_3d`` when asked).

    Other ranks (e.g. K views per case, ``[B, K, C, X, Y, Z]``) keep their layout.
    """
    tensor = tensor.to(device, non_blocking=device.type == "cuda")
    if channels_last and tensor.dim() == 5:
        tensor = tensor.contiguous(memory_format=torch.channels_last_3d)
    return tensor


def set_cudnn_benchmark(device: torch.device, enabled: bool) -> None:
    """Let cuDNN search the fastest convolution algorithms (CUDA only; off elsewhere).

    Worth it when every batch has the same shape (fixed training patches); the search
    costs the first steps.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = enabled
