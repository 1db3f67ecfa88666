"""Sites on GPUs: device choice, mixed precision, memory layout, sharing a GPU between sites.

Everything above the ``gpu`` marker runs on any machine (CPUs included); the tests
marked ``gpu`` need a CUDA device and are skipped, and listed as skipped, where torch
sees none.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from opacus.optimizers.optimizer import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

from fl_imaging.config import ConfigError, RunPlan, compose
from fl_imaging.data.manifest import TRAIN, Case
from fl_imaging.ml.devices import autocast, check_amp, select_device
from fl_imaging.ml.models import new_model
from fl_imaging.ml.training import LocalRecipe, train_local
from fl_imaging.privacy.dp_sgd import DpSgdSettings, train_private
from fl_imaging.site.resolve import load_site_manifest, resolve_site
from fl_imaging.site.rounds import evaluate_round, train_round
from fl_imaging.tools import gpu_share as gpu_share_module
from fl_imaging.tools.gpu_share import SiteFootprint, gpu_share, plan_gpu_share, probe
from tests.conftest import load_script, tiny_overrides

# --- where a site computes ------------------------------------------------------------


@pytest.mark.parametrize("visible", ["", "-1"])
def test_auto_without_an_assigned_gpu_is_the_cpu(
    visible: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert select_device("auto") == torch.device("cpu")


def test_a_site_given_a_gpu_it_cannot_use_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # what a simulation worker with a GPU share sees on a CPU-only torch build
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ValueError, match=r"given GPU 0 .* sees no CUDA device.*train\.device=cpu"):
        select_device("auto")
    assert select_device("cpu") == torch.device("cpu")  # asked for the CPU: fine


def test_a_gpu_share_on_a_machine_without_cuda_is_refused_before_the_run(
    tiny_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    items = tiny_overrides(tiny_sites, tmp_path)
    share = compose("demo", [*items, "federation.simulation.num_gpus_per_site=0.25"])
    with pytest.raises(ConfigError, match=r"num_gpus_per_site=0.25 but torch sees no CUDA"):
        gpu_share(share, "demo", items)
    assert gpu_share(compose("demo", items), "demo", items) == 0.0


def test_auto_on_a_machine_without_cuda_trains_on_cpus_and_says_so(
    tiny_sites: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    items = [*tiny_overrides(tiny_sites, tmp_path), "federation.simulation.num_gpus_per_site=auto"]
    with caplog.at_level(logging.INFO):
        assert gpu_share(compose("demo", items), "demo", items) == 0.0
    assert "no CUDA device on this machine: the sites train on CPUs" in caplog.text


# --- mixed precision and layout (on the CPU: bf16; fp16 is refused there) ------------


def test_amp_settings_are_checked_where_they_cannot_work(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    items = tiny_overrides(tiny_sites, tmp_path)
    with pytest.raises(ConfigError, match=r"train\.amp 'fp8' is unknown"):
        compose("demo", [*items, "train.amp=fp8"])
    with pytest.raises(ConfigError, match=r"train\.amp=fp16 needs a CUDA device"):
        compose("demo", [*items, "train.amp=fp16", "train.device=cpu"])
    with pytest.raises(
        ConfigError, match=r"train\.amp=fp16 with private sites .* use train\.amp=bf16"
    ):
        compose("demo_private", [*items, "train.amp=fp16"])
    with pytest.raises(ValueError, match=r"fp16 needs a CUDA device, this site computes on cpu"):
        check_amp("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"DP-SGD does not train with train\.amp=fp16"):
        train_private(
            _tiny_model(),
            _loader(4),
            LocalRecipe(optimizer="sgd", amp="fp16"),
            DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0),
            history=[],
        )


def test_bf16_autocasts_the_forward_pass_and_keeps_float32_weights() -> None:
    model, (images, _) = _tiny_model(), next(iter(_loader(4)))
    with autocast(torch.device("cpu"), "bf16"):
        assert model(images).dtype == torch.bfloat16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(model, _loader(4), LocalRecipe(optimizer="sgd", lr=0.1, amp="bf16"))
    assert result.steps == 1 and result.gpu_peak_mb == 0.0  # on a CPU: no GPU figure
    after = model.state_dict()
    assert all(after[k].dtype == before[k].dtype for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_dp_sgd_under_bf16_clips_and_noises_float32_per_patient_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clipped: list[tuple[set[torch.dtype], torch.Tensor]] = []
    original = DPOptimizer.clip_and_accumulate

    def spy(optimizer: DPOptimizer) -> None:
        samples = optimizer.grad_samples
        norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in samples], 1)
        clipped.append(({g.dtype for g in samples}, norms.norm(dim=1)))
        original(optimizer)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    max_norm = 0.05
    train_private(
        _tiny_model(),
        _loader(6),
        LocalRecipe(epochs=2, lr=0.1, optimizer="sgd", amp="bf16"),
        DpSgdSettings(noise_multiplier=1.0, max_grad_norm=max_norm),
        history=[],
    )
    assert len(clipped) == 2
    for dtypes, per_patient in clipped:
        # bfloat16 norms could put a clipped contribution ~0.4 % past max_grad_norm
        assert dtypes == {torch.float32}
        assert float(per_patient.min()) > max_norm  # clipping is active: the norm matters


def test_a_site_round_in_bf16_and_channels_last_trains_and_evaluates(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    items = tiny_overrides(tiny_sites, tmp_path)
    plans = {
        layout: compose("demo", [*items, "train.amp=bf16", f"train.channels_last={layout}"])
        for layout in ("false", "true")
    }
    weights = new_model(plans["false"]).state_dict()
    rounds = {}
    for layout, plan in plans.items():
        site = resolve_site({"partition-id": 0}, plan)
        outcome = train_round(site, plan, weights, server_round=1)
        assert outcome.weights is not None
        assert {t.dtype for t in outcome.weights.values()} == {torch.float32}
        rounds[layout] = outcome.weights
        assert 0.0 <= evaluate_round(site, plan, outcome.weights).dice_mean <= 1.0
    # the layout changes where the numbers live, not what is learnt
    for key, value in rounds["false"].items():
        torch.testing.assert_close(rounds["true"][key], value, rtol=0.05, atol=2e-3)


# --- how many sites share a GPU ---------------------------------------------------------


def _footprint(
    peak: float = 1000.0, context: float = 500.0, free: float = 80_000.0, gpus: int = 1
) -> SiteFootprint:
    return SiteFootprint(
        peak_mb=peak,
        context_mb=context,
        gpu_total_mb=free,
        gpu_free_mb=free,
        gpus=gpus,
        device_name="test GPU",
    )


def test_the_gpu_share_is_set_by_memory_cpus_or_sites_whichever_is_fewer() -> None:
    # memory: 80,000 x 0.9 / 1,500 = 48 sites at a time; 64 CPUs; 100 sites
    memory = plan_gpu_share(_footprint(), sites=100, cpus=64, cpus_per_site=1, memory_use=0.9)
    assert (memory.per_gpu, memory.limited_by, memory.by_memory) == (48, "GPU memory", 48)
    cpus = plan_gpu_share(_footprint(), sites=100, cpus=16, cpus_per_site=1, memory_use=0.9)
    assert (cpus.per_gpu, cpus.limited_by, cpus.num_gpus_per_site) == (16, "CPUs", 0.0589)
    two_cpus_each = plan_gpu_share(_footprint(), sites=100, cpus=16, cpus_per_site=2, memory_use=1)
    assert two_cpus_each.per_gpu == 8
    sites = plan_gpu_share(_footprint(), sites=3, cpus=16, cpus_per_site=1, memory_use=0.9)
    assert (sites.per_gpu, sites.limited_by) == (3, "sites")
    # two GPUs: the 16 CPUs' sites spread over both
    two = plan_gpu_share(_footprint(gpus=2), sites=100, cpus=16, cpus_per_site=1, memory_use=0.9)
    assert two.per_gpu == 8
    assert any("limited by CPUs" in line for line in cpus.lines())


@pytest.mark.parametrize("per_gpu", [3, 7, 16, 48, 999])
def test_the_share_never_lets_more_sites_onto_a_gpu_than_planned(per_gpu: int) -> None:
    context = 80_000.0 / (per_gpu + 0.5) - 1.0  # memory for per_gpu sites, not one more
    plan = plan_gpu_share(
        _footprint(peak=1.0, context=context),
        sites=10_000,
        cpus=10_000,
        cpus_per_site=1,
        memory_use=1,
    )
    # Ray counts shares in 0.0001 of a GPU: past ~100 per GPU not every count is possible
    assert plan.per_gpu == per_gpu if per_gpu < 100 else 900 < plan.per_gpu <= per_gpu
    share = plan.num_gpus_per_site
    assert share == round(share, 4)
    units = round(share * 10_000)
    assert plan.per_gpu * units <= 10_000 < (plan.per_gpu + 1) * units


def test_a_site_too_large_for_the_gpu_is_refused_with_what_to_change() -> None:
    with pytest.raises(ConfigError, match=r"one site needs 9000 MiB .* lower data\.patch_size"):
        plan_gpu_share(
            _footprint(peak=8500, context=500, free=9000),
            sites=3,
            cpus=4,
            cpus_per_site=1,
            memory_use=0.9,
        )


def test_auto_uses_the_probe_on_a_gpu_machine(
    tiny_sites: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the launcher's side of auto, with the probe's measurement given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_share_module, "available_cpus", lambda: 8)
    monkeypatch.setattr(gpu_share_module, "measure_footprint", lambda *_: _footprint())
    items = [*tiny_overrides(tiny_sites, tmp_path), "federation.simulation.num_gpus_per_site=auto"]
    with caplog.at_level(logging.INFO):
        share = gpu_share(compose("demo", items), "demo", items)
    assert share == 0.2501  # 3 sites, all at once (a fourth would not fit)
    assert "GPU plan: 3 sites -> 3 at a time per GPU" in caplog.text


def test_the_gpu_benchmark_times_the_plain_loop_and_the_dp_step_on_this_device(
    tiny_plan: RunPlan,
) -> None:
    bench = load_script("scripts/bench_gpu.py")
    train_cases = sum(len(_train_cases(tiny_plan, i)) for i in range(3))
    plain = bench.plain_loop(tiny_plan)
    assert plain["plain_cases"] == train_cases * tiny_plan.rounds
    assert plain["plain_cases_per_s"] > 0
    dp = bench.dp_step_cost(tiny_plan, steps=2)
    assert dp["dp_step_s"] > 0 and dp["plain_step_s"] > 0
    assert dp["dp_over_plain"] == round(dp["dp_step_s"] / dp["plain_step_s"], 2)


# --- on a CUDA device -------------------------------------------------------------------


@pytest.mark.gpu
def test_the_probe_measures_one_sites_gpu_footprint(tiny_plan: RunPlan) -> None:
    footprint = probe(tiny_plan)
    assert 0 < footprint.peak_mb < footprint.gpu_total_mb
    assert footprint.gpus >= 1 and footprint.context_mb >= 0


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_a_site_trains_on_the_gpu_and_reports_its_peak_memory(
    amp: str, tiny_sites: list[Path], tmp_path: Path
) -> None:
    items = [
        *tiny_overrides(tiny_sites, tmp_path),
        f"train.amp={amp}",
        "train.cudnn_benchmark=true",
    ]
    plan = compose("demo", items)
    site = resolve_site({"partition-id": 0}, plan)
    outcome = train_round(site, plan, new_model(plan).state_dict(), server_round=1)
    assert outcome.result is not None and outcome.weights is not None
    assert outcome.result.gpu_peak_mb > 0
    assert {t.device.type for t in outcome.weights.values()} == {"cpu"}


@pytest.mark.gpu
def test_a_private_site_trains_on_the_gpu_in_bf16(dp_sites: list[Path], tmp_path: Path) -> None:
    items = [*tiny_overrides(dp_sites, tmp_path), "train.amp=bf16"]
    plan = compose("demo_private", items)
    site = resolve_site({"partition-id": 0}, plan)
    outcome = train_round(site, plan, new_model(plan).state_dict(), server_round=1, run_id="g")
    assert outcome.result is not None and outcome.privacy is not None
    assert outcome.result.gpu_peak_mb > 0 and outcome.privacy.epsilon_spent > 0


def _train_cases(plan: RunPlan, index: int) -> list[Case]:
    site = resolve_site({"partition-id": index}, plan)
    return load_site_manifest(site, plan).split(TRAIN)


def _tiny_model() -> torch.nn.Module:
    return new_model(compose("demo", ["model=unet_tiny", "data.patch_size=[8,8,8]"]))


def _loader(cases: int) -> DataLoader:
    """One batch of ``cases`` random 8^3 volumes with labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(cases, 1, 8, 8, 8, generator=g)
    labels = torch.randint(0, 3, (cases, 1, 8, 8, 8), generator=g).float()
    return DataLoader(TensorDataset(images, labels), batch_size=cases)
