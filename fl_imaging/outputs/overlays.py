"""Slice overlays of prediction versus ground truth for a few validation cases of a site.

This reads the site's scans, so it runs where the data is: at the site, or on the
one machine of a simulation. In a real deployment the server never has the data;
a hospital renders its own overlays with ``fl-imaging report RUN`` locally.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from fl_imaging.config import RunPlan
from fl_imaging.data.loading import eval_loader
from fl_imaging.data.manifest import VAL
from fl_imaging.ml.training import whole_volume_logits
from fl_imaging.site.resolve import Site, load_site_manifest

logger = logging.getLogger(__name__)

# label 1, 2, 3, ... colours (RGB); background is left transparent
COLOURS = ["#ffd23f", "#ee4266", "#3bceac", "#540d6e", "#0ead69", "#f78c6b"]


def _gray_rgb(slice_2d: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` intensities in [0, 1] -> ``[3, H, W]`` uint8 grey image."""
    img = (slice_2d.clamp(0, 1) * 255).to(torch.uint8)
    return img.expand(3, *img.shape).clone()


def _masks(labels_2d: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.stack([labels_2d == k for k in range(1, num_classes)])


@torch.no_grad()
def render_site_overlays(
    site: Site, plan: RunPlan, model: torch.nn.Module, out_png: Path, max_cases: int = 3
) -> Path:
    """Write a PNG grid of ground truth (left) and prediction (right) overlays.

    For each of the first ``max_cases`` validation cases: the axial slice with the
    most foreground. Returns ``out_png``; small images are upscaled to be readable.
    """
    manifest = load_site_manifest(site, plan)
    cases = manifest.split(VAL)[:max_cases]
    # Imported only once there are scans to draw: the deployment image (Dockerfile)
    # has no torchvision, its server never holding scans.
    from torchvision.io import write_png
    from torchvision.utils import draw_segmentation_masks, make_grid

    num_classes = len(plan.data.labels)  # training classes (label values remapped)
    colours = COLOURS[: num_classes - 1]
    model.eval()
    panels: list[torch.Tensor] = []
    for batch in eval_loader(cases, plan.data):
        image, label = batch["image"], batch["label"]
        logits = whole_volume_logits(model, image, plan.data.patch_size)
        pred = logits.argmax(dim=1)[0]  # [X, Y, Z]
        truth = label[0, 0].round().long()
        z = int((truth > 0).sum(dim=(0, 1)).argmax())  # axial slice with most foreground
        grey = _gray_rgb(image[0, 0, :, :, z].T.flip(0))  # rows: anterior at the top
        for labels_2d in (truth[:, :, z], pred[:, :, z]):
            masks = _masks(labels_2d.T.flip(0), num_classes)
            panels.append(draw_segmentation_masks(grey, masks, alpha=0.45, colors=colours))
    if not panels:
        raise ValueError(f"site {site.name}: no validation cases to draw")
    height = max(p.shape[1] for p in panels)
    width = max(p.shape[2] for p in panels)
    padded = [  # cases differ in size: pad each panel (white) to the largest
        torch.nn.functional.pad(p, (0, width - p.shape[2], 0, height - p.shape[1]), value=255)
        for p in panels
    ]
    grid = make_grid(padded, nrow=2, padding=4, pad_value=255)
    scale = max(1, 256 // max(height, width))
    if scale > 1:
        grid = torch.nn.functional.interpolate(
            grid[None].float(), scale_factor=scale, mode="nearest"
        )[0].to(torch.uint8)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    write_png(grid, str(out_png))
    return out_png


def legend(labels: dict[int, str]) -> Sequence[tuple[str, str]]:
    """``(name, colour)`` of each foreground label, as drawn in the overlays."""
    return [(labels[k], COLOURS[k - 1]) for k in sorted(labels) if k > 0]


def render_run_overlays(run_dir: Path, max_cases: int = 3) -> tuple[dict[str, Path], str]:
    """Overlays of the run's best model for every site whose data is readable here.

    Returns ``(site -> PNG in run_dir/report, note)``; the note names the sites whose
    data is not on this machine (the normal case for a server in deployment).
    """
    from omegaconf import OmegaConf

    from fl_imaging.config import ConfigError, to_plan
    from fl_imaging.data.manifest import ManifestError
    from fl_imaging.outputs.reporting import CHECKPOINT_DIR, CONFIG_FILE, REPORT_DIR
    from fl_imaging.site.resolve import configured_sites
    from fl_imaging.tools.inference import load_predictor

    checkpoint = run_dir / CHECKPOINT_DIR / "best.pt"
    if not checkpoint.is_file():
        return {}, "No checkpoint yet: no overlays."
    plan = to_plan(OmegaConf.load(run_dir / CONFIG_FILE), check=False)
    predictor = load_predictor(checkpoint)
    overlays: dict[str, Path] = {}
    missing: list[str] = []
    for site in configured_sites(plan):
        out = run_dir / REPORT_DIR / f"overlays_{site.name}.png"
        try:
            overlays[site.name] = render_site_overlays(site, plan, predictor.model, out, max_cases)
        except (ManifestError, ConfigError, OSError, ValueError) as exc:
            logger.info("no overlays for site %s: %s", site.name, exc)
            missing.append(site.name)
    note = ""
    if missing:
        note = (
            f"No overlays for {', '.join(missing)}: their scans are not readable on this "
            f"machine (in a deployment the data stays at each hospital; run "
            f"`fl-imaging report RUN` there to add them)."
        )
    return overlays, note


def run_legend(run_dir: Path) -> list[tuple[str, str]]:
    """The overlay legend of a run folder's labels (from its ``config.yaml``)."""
    from omegaconf import OmegaConf

    from fl_imaging.outputs.reporting import CONFIG_FILE

    labels = OmegaConf.load(run_dir / CONFIG_FILE).data.labels
    return list(legend({int(k): str(v) for k, v in labels.items()}))


def report_with_overlays(run_dir: Path, *, overlays: bool = True) -> Path:
    """(Re)write a run's report with overlays of every site whose scans are on this machine.

    Run where the scans are: at a hospital (its own sites), or by ``fl-imaging run``
    for a local simulation. The server never calls it. Returns the HTML report's path.
    """
    from fl_imaging.outputs.reporting import write_report

    drawn, note = render_run_overlays(run_dir) if overlays else ({}, "")
    return write_report(run_dir, drawn, note, run_legend(run_dir))
