"""How many virtual hospitals share a GPU at once: ``num_gpus_per_site=auto``.

Flower's simulation engine (Ray) runs as many virtual sites at a time as their
resource requests fit: ``client-resources-num-gpus=1/k`` lets ``k`` sites share one
GPU. With ``federation.simulation.num_gpus_per_site=auto`` :func:`gpu_share` picks
``k`` before the run starts, from

* one site's GPU footprint, measured by a probe process (:func:`probe`) that takes
  one training step of the configured network on random tensors of the configured
  patch and batch size (a DP-SGD step when any site is private; no patient data),
  plus the CUDA context each worker process holds besides it (nvidia-smi's count for
  the probe process, less what torch reserved; ``CONTEXT_FALLBACK_MB`` without it);
* the GPU's free memory times ``federation.simulation.gpu_memory_use``;
* the CPUs (``num_cpus_per_site`` each) and the number of sites.

The arithmetic (:func:`plan_gpu_share`) is a plain function, tested on any machine;
the probe needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from fl_imaging.config import ConfigError, RunPlan

logger = logging.getLogger(__name__)

# Ray accepts GPU shares to 4 decimals
_SHARE_DECIMALS = 4
# a worker's CUDA context and loaded kernels when nvidia-smi cannot measure it (MiB);
# what CUDA 12-13 processes with torch, cuDNN and cuBLAS loaded usually hold
CONTEXT_FALLBACK_MB = 600.0


@dataclass(frozen=True)
class SiteFootprint:
    """What one virtual site needs on a GPU, and what the GPU offers (MiB)."""

    peak_mb: float  # torch.cuda.max_memory_reserved over one training step
    context_mb: float  # the CUDA context and kernels a worker process holds besides
    gpu_total_mb: float
    gpu_free_mb: float  # free before the probe ran (other processes' use excluded)
    gpus: int  # CUDA devices visible to the run
    device_name: str


@dataclass(frozen=True)
class GpuShare:
    """The plan: how many sites train at once per GPU, and the share each asks for."""

    sites: int
    per_gpu: int  # sites training at the same time on each GPU
    num_gpus_per_site: float  # what the simulation is given (1 / per_gpu, rounded down)
    limited_by: str  # "GPU memory", "CPUs" or "sites"
    by_memory: int  # sites one GPU's memory holds at once
    by_cpus: int  # sites the CPUs run at once
    footprint: SiteFootprint

    def lines(self) -> list[str]:
        """The plan as `fl-imaging run` prints it."""
        fp = self.footprint
        return [
            f"GPU plan: {fp.gpus} x {fp.device_name} ({fp.gpu_total_mb:.0f} MiB, "
            f"{fp.gpu_free_mb:.0f} free); one site's training step peaks at "
            f"{fp.peak_mb:.0f} MiB plus {fp.context_mb:.0f} MiB of CUDA context per worker",
            f"GPU plan: {self.sites} sites -> {self.per_gpu} at a time per GPU "
            f"(num_gpus_per_site {self.num_gpus_per_site:g}; memory holds {self.by_memory}, "
            f"CPUs run {self.by_cpus}): limited by {self.limited_by}",
        ]


def plan_gpu_share(
    footprint: SiteFootprint,
    *,
    sites: int,
    cpus: int,
    cpus_per_site: float,
    memory_use: float,
) -> GpuShare:
    """How many of ``sites`` share each GPU at once, given ``footprint``.

    ``per_gpu = min(memory, CPUs, sites)`` spread over the GPUs, where memory holds
    ``floor(free * memory_use / (peak + context))`` sites per GPU and the CPUs run
    ``floor(cpus / cpus_per_site)`` sites in all. The share is the smallest multiple of
    Ray's 0.0001 above ``1 / (per_gpu + 1)``, so one site more never fits; where that
    share lets fewer than ``per_gpu`` fit (more than ~100 per GPU), ``per_gpu`` is what fits.

    Raises:
        ConfigError: one site does not fit in the GPU's usable memory, or the CPUs
            cannot run one site.
    """
    if sites < 1 or footprint.gpus < 1:
        raise ValueError(f"need sites >= 1 and gpus >= 1, got {sites}, {footprint.gpus}")
    per_site = footprint.peak_mb + footprint.context_mb
    usable = footprint.gpu_free_mb * memory_use
    by_memory = math.floor(usable / per_site) if per_site > 0 else sites
    if by_memory < 1:
        raise ConfigError(
            f"federation.simulation.num_gpus_per_site=auto: one site needs {per_site:.0f} MiB "
            f"({footprint.peak_mb:.0f} training + {footprint.context_mb:.0f} context) but "
            f"{footprint.device_name} offers {usable:.0f} MiB ({memory_use:g} of "
            f"{footprint.gpu_free_mb:.0f} free); lower data.patch_size, train.batch_size or "
            f"privacy.max_physical_batch, or train on CPUs (num_gpus_per_site=0)"
        )
    by_cpus = math.floor(cpus / cpus_per_site)
    if by_cpus < 1:
        raise ConfigError(
            f"federation.simulation.num_cpus_per_site={cpus_per_site:g} but this machine has "
            f"{cpus} CPUs"
        )
    limits = {
        "GPU memory": by_memory * footprint.gpus,
        "CPUs": by_cpus,
        "sites": sites,
    }
    limited_by = min(limits, key=lambda k: limits[k])
    per_gpu = max(1, math.ceil(limits[limited_by] / footprint.gpus))
    per_gpu = min(per_gpu, by_memory)
    units = 10**_SHARE_DECIMALS  # Ray counts a GPU in these units
    share_units = units // (per_gpu + 1) + 1  # more than 1 / (per_gpu + 1) of a GPU
    per_gpu = units // share_units
    share = share_units / units
    return GpuShare(
        sites=sites,
        per_gpu=per_gpu,
        num_gpus_per_site=share,
        limited_by=limited_by,
        by_memory=by_memory,
        by_cpus=by_cpus,
        footprint=footprint,
    )


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def gpu_share(plan: RunPlan, experiment: str, overrides: Sequence[str]) -> float:
    """The ``client-resources-num-gpus`` of the run: the configured share, or ``auto``'s plan.

    ``auto`` on a machine without CUDA is 0 (the sites train on CPUs) and says so; a
    share above 0 on such a machine is refused (the simulation would wait forever for
    a GPU it cannot schedule).

    Raises:
        ConfigError: a GPU share without a CUDA device, a probe that failed, or a site
            that fits on no GPU.
    """
    import torch

    wanted = plan.federation.simulation.num_gpus_per_site
    has_cuda = torch.cuda.is_available()
    if wanted != "auto":
        if float(wanted) > 0 and not has_cuda:
            raise ConfigError(
                f"federation.simulation.num_gpus_per_site={wanted:g} but torch sees no CUDA "
                f"device on this machine; use 0 (CPUs) or auto"
            )
        return float(wanted)
    if not has_cuda:
        logger.info("GPU plan: no CUDA device on this machine: the sites train on CPUs")
        return 0.0
    footprint = measure_footprint(experiment, overrides)
    share = plan_gpu_share(
        footprint,
        sites=len(plan.federation.sites),
        cpus=available_cpus(),
        cpus_per_site=plan.federation.simulation.num_cpus_per_site,
        memory_use=plan.federation.simulation.gpu_memory_use,
    )
    for line in share.lines():
        logger.info("%s", line)
    return share.num_gpus_per_site


def measure_footprint(experiment: str, overrides: Sequence[str]) -> SiteFootprint:
    """Run :func:`probe` in a fresh process (its CUDA context ends with it).

    Raises:
        ConfigError: the probe failed (its last output lines are in the message).
    """
    command = [sys.executable, "-m", __name__, "--experiment", experiment, "--", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise ConfigError(f"num_gpus_per_site=auto: the GPU probe failed:\n{tail}")
    return SiteFootprint(**json.loads(done.stdout.strip().splitlines()[-1]))


def _used_by_process_mb(pid: int) -> float | None:
    """This process's GPU memory as nvidia-smi sees it (context included); None: unknown."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    done = subprocess.run(query, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return float(fields[1])
    return None


def probe(plan: RunPlan) -> SiteFootprint:
    """One site's training step on the GPU, on random tensors; its memory footprint.

    The step is what the largest site runs: its batch (``site_batch_size``), the patch
    size, K views when private, DP-SGD (Opacus, per-sample gradients) when any site is
    private, else plain training, with ``train.amp`` and ``train.channels_last``.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fl_imaging.data.manifest import TRAIN
    from fl_imaging.ml.devices import place_model, select_device
    from fl_imaging.ml.models import new_model
    from fl_imaging.ml.training import LocalRecipe, train_local
    from fl_imaging.privacy.dp_sgd import DpSgdSettings, train_private
    from fl_imaging.site.resolve import configured_sites, load_site_manifest, site_batch_size
    from fl_imaging.site.rounds import private_train_config

    device = select_device("cuda")
    free, total = (v / 2**20 for v in torch.cuda.mem_get_info(device))
    sites = configured_sites(plan)
    batch = max(
        site_batch_size(s, plan, len(load_site_manifest(s, plan).split(TRAIN))) for s in sites
    )
    private = any(s.config.privacy.epsilon is not None for s in sites)
    views = plan.privacy.augmentations if private else 1
    shape = (batch, views, len(plan.data.modalities), *plan.data.patch_size)
    images = torch.rand(shape) if views > 1 else torch.rand(shape).squeeze(1)
    labels = torch.randint(0, len(plan.data.labels), images.shape).narrow(-4, 0, 1).float()
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch)
    model = place_model(new_model(plan), device, channels_last=plan.train.channels_last)
    torch.cuda.reset_peak_memory_stats(device)
    if private:
        recipe = LocalRecipe.from_config(private_train_config(plan), epochs=1)
        dp = DpSgdSettings.from_config(
            plan.privacy,
            noise_multiplier=1.0,
            max_grad_norm=plan.privacy.max_grad_norm,
            accountant=plan.privacy.accountant,
        )
        train_private(model, loader, recipe, dp, history=[])
    else:
        train_local(model, loader, LocalRecipe.from_config(plan.train, epochs=1))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_reserved(device) / 2**20
    reserved = torch.cuda.memory_reserved(device) / 2**20
    used = _used_by_process_mb(os.getpid())
    return SiteFootprint(
        peak_mb=peak,
        context_mb=CONTEXT_FALLBACK_MB if used is None else max(used - reserved, 0.0),
        gpu_total_mb=total,
        gpu_free_mb=free,
        gpus=torch.cuda.device_count(),
        device_name=torch.cuda.get_device_name(device),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m fl_imaging.tools.gpu_share --experiment X -- overrides``: print the footprint."""
    from fl_imaging.config import compose

    parser = argparse.ArgumentParser(description="measure one site's GPU footprint (JSON)")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    print(json.dumps(asdict(probe(compose(args.experiment, args.overrides)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
