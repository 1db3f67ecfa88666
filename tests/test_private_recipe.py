"""The DP-SGD recipe's parts: views per patient, physical batches, freezing, warm start."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from opacus.optimizers.optimizer import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

import fl_imaging.site.rounds as rounds_module
from fl_imaging.config import ConfigError, RunPlan, compose, compose_dictconfig, to_plan, validate
from fl_imaging.ml.models import initial_weights, new_model
from fl_imaging.ml.training import (
    LocalRecipe,
    WeightAverage,
    new_optimizer,
    round_lr,
    segmentation_loss,
)
from fl_imaging.privacy.dp_sgd import (
    DpSgdSettings,
    clipping_groups,
    fold_views,
    freeze_except,
    held_norms,
    train_private,
)
from fl_imaging.site.resolve import resolve_site
from fl_imaging.site.rounds import train_round
from tests.conftest import load_script, tiny_overrides


def _tiny_model() -> torch.nn.Module:
    plan = compose("demo", ["model=unet_tiny", "data.patch_size=[8,8,8]"])
    return new_model(plan)


def _views_loader(cases: int, views: int, batch: int) -> DataLoader:
    """``(image [K, 1, 8^3], label [K, 1, 8^3])`` per case: ``views`` different views."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(cases, views, 1, 8, 8, 8, generator=g) * 3
    labels = (torch.rand(cases, views, 1, 8, 8, 8, generator=g) > 0.7).float()
    return DataLoader(TensorDataset(images, labels), batch_size=batch)


class _ClipSpy:
    """Records, at every Opacus clipping, the per-sample gradients and their clipped norms."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows: list[int] = []
        self.clipped_norms: list[torch.Tensor] = []
        self.first_case: list[list[torch.Tensor]] = []  # case 0's gradient, per tensor
        original = DPOptimizer.clip_and_accumulate

        def spy(optimizer: DPOptimizer) -> None:
            samples = optimizer.grad_samples
            self.first_case.append([g[0].clone() for g in samples])
            norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in samples], 1)
            per_sample = norms.norm(dim=1)
            factor = (optimizer.max_grad_norm / (per_sample + 1e-6)).clamp(max=1.0)
            self.rows.append(per_sample.shape[0])
            self.clipped_norms.append(per_sample * factor)
            original(optimizer)

        monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)


def test_each_patient_is_one_clipped_contribution_with_several_views(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = _ClipSpy(monkeypatch)
    cases, views, max_norm = 6, 3, 0.05
    train_private(
        _tiny_model(),
        _views_loader(cases, views, batch=cases),
        LocalRecipe(epochs=3, lr=0.1, weight_decay=0.0, optimizer="sgd"),
        DpSgdSettings(noise_multiplier=1.0, max_grad_norm=max_norm, accountant="rdp"),
        history=[],
    )
    # q = 1 (one batch of all cases): every step clips exactly one row per patient, not
    # one per view (18 network inputs each step)
    assert spy.rows == [cases] * 3
    for norms in spy.clipped_norms:
        assert float(norms.max()) <= max_norm * (1 + 1e-4)


def test_the_clipping_only_diagnostic_clips_each_patient_and_adds_no_noise(
    monkeypatch: pytest.MonkeyPatch, tiny_sites: list[Path], tmp_path: Path
) -> None:
    spy = _ClipSpy(monkeypatch)
    noise: list[float] = []
    original_noise = DPOptimizer.add_noise

    def record_noise(optimizer: DPOptimizer) -> None:
        noise.append(optimizer.noise_multiplier)
        original_noise(optimizer)

    monkeypatch.setattr(DPOptimizer, "add_noise", record_noise)
    items = [*tiny_overrides(tiny_sites, tmp_path), "privacy.max_grad_norm=0.05", "rounds=2"]
    plan = compose("demo_private", items)
    report = load_script("scripts/bench_clipping_only.py").run(plan)
    assert set(report["dice_mean_per_round"]) == {1, 2}
    assert set(report["final_dice_per_site"]) == set(plan.site_names)
    assert spy.clipped_norms and noise and set(noise) == {0.0}
    for norms in spy.clipped_norms:
        assert float(norms.max()) <= 0.05 * (1 + 1e-4)


def test_clipping_in_groups_keeps_each_groups_share_and_the_total_sensitivity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # per sample: output stage, total
    original = DPOptimizer.clip_and_accumulate

    def spy(optimizer: DPOptimizer) -> None:
        norms = [g.reshape(g.shape[0], -1).norm(dim=1) for g in optimizer.grad_samples]
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        pairs = zip(names, norms, strict=True)
        head = torch.stack([x for n, x in pairs if n.startswith("model.2")])
        seen.append((head.norm(dim=0), torch.stack(norms).norm(dim=0)))
        original(optimizer)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    model, max_norm = _tiny_model(), 0.05
    train_private(
        model,
        _views_loader(6, 1, batch=6),
        LocalRecipe(epochs=2, lr=0.1, optimizer="sgd"),
        DpSgdSettings(
            noise_multiplier=1.0, max_grad_norm=max_norm, clip_shares=(("model.2", 0.5),)
        ),
        history=[],
    )
    assert len(seen) == 2
    for head, total in seen:
        # the output stage holds nearly all of a patient's gradient here, yet keeps half
        # the norm; the rest gets sqrt(1 - 0.25) of it; the whole stays within the norm
        assert float(head.max()) <= 0.5 * max_norm * (1 + 1e-4)
        assert float(total.max()) <= max_norm * (1 + 1e-4)
        assert float((total**2 - head**2).sqrt().min()) > 0.5 * max_norm


def test_held_norms_keep_every_kernel_but_the_last_at_its_initial_norm() -> None:
    def kernels(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.dim() >= 2]

    for hold in (False, True):
        model = _tiny_model()
        fresh = [float(p.norm()) for p in kernels(model)]
        # the target is the default initialisation's norm, from the shape alone
        targets = [norm for _, norm in held_norms(model)]
        assert len(targets) == len(fresh) - 1
        assert all(abs(t / f - 1) < 0.35 for t, f in zip(targets, fresh, strict=False))
        train_private(
            model,
            _views_loader(6, 1, batch=6),
            LocalRecipe(epochs=3, lr=1.0, optimizer="sgd"),
            # a noise that inflates every kernel within a few steps
            DpSgdSettings(noise_multiplier=50.0, max_grad_norm=1.0, hold_norms=hold),
            history=[],
        )
        after = [float(p.norm()) for p in kernels(model)]
        if hold:
            assert all(abs(a - t) < 1e-4 * t for a, t in zip(after, targets, strict=False))
            assert after[-1] > 1.5 * fresh[-1]  # the output layer is left free
        else:
            assert all(a > 1.5 * t for a, t in zip(after, targets, strict=False))


def test_clipping_groups_are_checked() -> None:
    model = _tiny_model()
    groups = clipping_groups(model, [("model.2", 0.6)], 1.0)
    assert [round(norm, 6) for _, norm in groups] == [0.6, 0.8]
    assert sum(len(params) for params, _ in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match=r"match no trainable weight"):
        clipping_groups(model, [("model.9", 0.5)], 1.0)
    with pytest.raises(ValueError, match=r"matches several prefixes"):
        clipping_groups(model, [("model.2", 0.5), ("model.2.conv", 0.5)], 1.0)
    with pytest.raises(ValueError, match=r"squares summing below 1"):
        clipping_groups(model, [("model.2", 0.8), ("model.0", 0.7)], 1.0)
    group = "privacy.clip_groups=[{prefix:model.2,share:0.5}]"
    assert compose("demo_private", [group]).privacy.clip_groups[0].share == 0.5
    too_large = "privacy.clip_groups=[{prefix:model.2,share:0.8},{prefix:model.0,share:0.7}]"
    with pytest.raises(ConfigError, match=r"squares sum below 1"):
        compose("demo_private", [too_large])
    with pytest.raises(ConfigError, match=r"clip_groups needs privacy\.clipping=flat"):
        compose("demo_private", [group, "privacy.clipping=per_layer"])


def test_per_layer_clipping_keeps_the_total_sensitivity(monkeypatch: pytest.MonkeyPatch) -> None:
    from opacus.optimizers.perlayeroptimizer import DPPerLayerOptimizer

    seen: list[tuple[list[float], float]] = []
    original = DPPerLayerOptimizer.clip_and_accumulate

    def spy(optimizer: DPPerLayerOptimizer) -> None:
        seen.append((list(optimizer.max_grad_norms), optimizer.max_grad_norm))
        original(optimizer)

    monkeypatch.setattr(DPPerLayerOptimizer, "clip_and_accumulate", spy)
    model = _tiny_model()
    train_private(
        model,
        _views_loader(cases=4, views=1, batch=4),
        LocalRecipe(epochs=1, lr=0.1, weight_decay=0.0, optimizer="sgd"),
        DpSgdSettings(
            noise_multiplier=1.0, max_grad_norm=0.5, accountant="rdp", clipping="per_layer"
        ),
        history=[],
    )
    norms, total = seen[0]
    assert len(norms) == len(list(model.parameters()))
    assert total == pytest.approx(0.5)  # the noise is sigma x 0.5, as with flat clipping
    assert math.sqrt(sum(n * n for n in norms)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"privacy\.clipping 'auto' is unknown"):
        train_private(
            _tiny_model(),
            _views_loader(cases=4, views=1, batch=4),
            LocalRecipe(epochs=1, lr=0.1, weight_decay=0.0),
            DpSgdSettings(
                noise_multiplier=1.0, max_grad_norm=0.5, accountant="rdp", clipping="auto"
            ),
            history=[],
        )


def test_fold_views_averages_the_views_of_each_case() -> None:
    param = torch.nn.Parameter(torch.zeros(2, 3))
    per_view = torch.arange(4 * 3 * 2 * 3, dtype=torch.float32).reshape(12, 2, 3)
    param.grad_sample = per_view.clone()
    fold_views([param], cases=4)
    assert param.grad_sample.shape == (4, 2, 3)
    torch.testing.assert_close(param.grad_sample, per_view.view(4, 3, 2, 3).mean(1))
    with pytest.raises(RuntimeError, match="do not split"):
        param.grad_sample = torch.zeros(5, 2, 3)
        fold_views([param], cases=2)


def test_physical_batches_make_one_noisy_step_per_poisson_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = []
    original = DPOptimizer.add_noise

    def count(optimizer: DPOptimizer) -> None:
        steps.append(1)
        original(optimizer)

    monkeypatch.setattr(DPOptimizer, "add_noise", count)
    loader = _views_loader(cases=12, views=1, batch=12)
    _, result, history = train_private(
        _tiny_model(),
        loader,
        LocalRecipe(epochs=4, lr=0.1, weight_decay=0.0, optimizer="sgd"),
        DpSgdSettings(
            noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", max_physical_batch=5
        ),
        history=[],
    )
    assert sum(n for _, _, n in history) == 4  # q = 1: one step per epoch, accounted
    assert len(steps) == result.steps <= 4  # one noise draw per logical batch only


def test_frozen_weights_come_back_unchanged_and_a_typo_is_refused() -> None:
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_stage = [n for n, _ in model.named_parameters()][-1].rsplit(".", 1)[0]
    weights, _, _ = train_private(
        model,
        _views_loader(cases=8, views=1, batch=8),
        LocalRecipe(epochs=2, lr=0.5, weight_decay=0.0, optimizer="sgd"),
        DpSgdSettings(
            noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", trainable=[out_stage]
        ),
        history=[],
    )
    changed = {k for k in weights if not torch.equal(weights[k], before[k])}
    assert changed and all(k.startswith(out_stage) for k in changed), changed
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again afterwards
    with pytest.raises(ValueError, match=r"privacy.trainable \['model.99'\] match no parameter"):
        freeze_except(_tiny_model(), ["model.99"])


def test_sgd_and_weight_average() -> None:
    model = torch.nn.Linear(2, 1)
    assert isinstance(new_optimizer(model.parameters(), "sgd", lr=0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match=r"train\.optimizer 'lion' is unknown"):
        new_optimizer(model.parameters(), "lion", lr=0.1)
    average = WeightAverage(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    average.update()  # (start + start + 2) / 2
    with torch.no_grad():
        model.weight.add_(2.0)
    average.update()
    average.copy_to()  # ((start + 1) + (start + 4)) / 2
    torch.testing.assert_close(model.weight.detach(), start + 2.5)


def test_recipe_settings_are_validated() -> None:
    grouped = ["model.norm=group", "model.num_groups=2"]
    problems = validate(_unchecked("hippocampus_private", grouped))
    assert any("model.num_groups=2 must divide" in p and "3 classes" in p for p in problems)
    assert not validate(compose("hippocampus_private", ["model.norm=group"]))
    bad = _unchecked(
        "demo",
        [
            "privacy.augmentations=0",
            "train.momentum=1.0",
            "train.ema_decay=1.5",
            "train.batch_size=-1",
            "train.lr_schedule=linear",
        ],
    )
    text = "\n".join(validate(bad))
    for key in ("privacy.augmentations", "train.momentum", "train.ema_decay", "train.batch_size"):
        assert key in text
    assert "train.lr_schedule 'linear' is unknown" in text


def _unchecked(experiment: str, overrides: list[str]) -> RunPlan:
    return to_plan(compose_dictconfig(experiment, overrides), check=False)


@pytest.fixture
def warm_plan(tiny_sites: list[Path], tmp_path: Path) -> RunPlan:
    return compose("demo", [*tiny_overrides(tiny_sites, tmp_path), "train.batch_size=0"])


def test_a_checkpoint_warm_starts_the_run_and_a_misfit_is_named(
    warm_plan: RunPlan, tmp_path: Path
) -> None:
    trained = {k: v + 0.25 for k, v in new_model(warm_plan).state_dict().items()}
    run_ckpt = tmp_path / "last.pt"
    torch.save({"round": 3, "state_dict": trained}, run_ckpt)  # a run folder's checkpoint
    plan = compose("demo", [f"model.init_checkpoint={run_ckpt}", *_overrides(warm_plan)])
    start = initial_weights(plan)
    assert all(torch.equal(start[k], trained[k]) for k in trained)
    bare = tmp_path / "weights.pt"
    torch.save(trained, bare)  # a plain state dict works too
    plan = compose("demo", [f"model.init_checkpoint={bare}", *_overrides(warm_plan)])
    assert all(torch.equal(initial_weights(plan)[k], trained[k]) for k in trained)
    bigger = compose(
        "demo", [f"model.init_checkpoint={bare}", *_overrides(warm_plan), "model.channels=[8,16]"]
    )
    with pytest.raises(
        ConfigError,
        match=r"weights.pt does not fit the configured model .*"
        r"other shape",
    ):
        initial_weights(bigger)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"broken\.pt: not a readable weights file"):
        initial_weights(
            compose("demo", [f"model.init_checkpoint={broken}", *_overrides(warm_plan)])
        )
    with pytest.raises(ConfigError, match=r"missing\.pt: no such file"):
        initial_weights(
            compose(
                "demo", [f"model.init_checkpoint={tmp_path / 'missing.pt'}", *_overrides(warm_plan)]
            )
        )


def _overrides(plan: RunPlan) -> list[str]:
    return ["model=unet_tiny", "data.patch_size=[16,16,16]", f"paths.root={plan.paths.root}"]


def test_full_batch_trains_every_case_in_one_step(warm_plan: RunPlan) -> None:
    site = resolve_site({"partition-id": 0}, warm_plan)
    outcome = train_round(site, warm_plan, new_model(warm_plan).state_dict(), server_round=1)
    assert outcome.result is not None
    assert outcome.result.steps == 1  # batch_size 0: all training cases in one step


def test_a_cosine_schedule_decays_the_learning_rate_over_the_rounds(
    tiny_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # per round, the values of torch's CosineAnnealingLR stepped once per round
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    for server_round in range(1, 11):
        expected = optimizer.param_groups[0]["lr"]
        assert round_lr(0.1, "cosine", server_round, 10) == pytest.approx(expected)
        assert round_lr(0.1, "constant", server_round, 10) == 0.1
        optimizer.step()
        schedule.step()
    assert round_lr(0.1, "cosine", 12, 10) == round_lr(0.1, "cosine", 10, 10)  # a fine-tune
    # the site trains round 3 of 4 at the scheduled rate
    overrides = [*tiny_overrides(tiny_sites, tmp_path), "rounds=4", "train.lr_schedule=cosine"]
    plan = compose("demo", overrides)
    used: list[float] = []
    original = rounds_module.train_local

    def spy(model, loader, recipe, **kwargs):  # type: ignore[no-untyped-def]
        used.append(recipe.lr)
        return original(model, loader, recipe, **kwargs)

    monkeypatch.setattr(rounds_module, "train_local", spy)
    site = resolve_site({"partition-id": 0}, plan)
    train_round(site, plan, new_model(plan).state_dict(), server_round=3)
    assert plan.rounds == 4 and used == [pytest.approx(plan.train.lr * 0.5)]


def test_private_sites_step_at_privacy_lr_and_the_others_at_train_lr(
    tiny_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # site 0 trains with DP-SGD, site 1 without; both follow the cosine schedule
    plan = compose(
        "demo",
        [
            *tiny_overrides(tiny_sites, tmp_path),
            "rounds=4",
            "train.lr_schedule=cosine",
            "train.optimizer=sgd",
            "train.lr=0.01",
            "privacy.lr=0.4",
            "federation.sites.0.privacy.epsilon=8",
            "federation.sites.0.privacy.delta=1e-3",
        ],
    )
    used: dict[str, float] = {}
    plain, private = rounds_module.train_local, rounds_module.train_private

    def plain_spy(model, loader, recipe, **kwargs):  # type: ignore[no-untyped-def]
        used["plain"] = recipe.lr
        return plain(model, loader, recipe, **kwargs)

    def private_spy(model, loader, recipe, dp, **kwargs):  # type: ignore[no-untyped-def]
        used["private"] = recipe.lr
        return private(model, loader, recipe, dp, **kwargs)

    monkeypatch.setattr(rounds_module, "train_local", plain_spy)
    monkeypatch.setattr(rounds_module, "train_private", private_spy)
    for partition in (0, 1):
        site = resolve_site({"partition-id": partition}, plan)
        outcome = train_round(site, plan, new_model(plan).state_dict(), server_round=3)
        assert outcome.result is not None
    assert used == {"private": pytest.approx(0.4 * 0.5), "plain": pytest.approx(0.01 * 0.5)}
    # null: the private sites take train.lr
    assert compose("demo").privacy.lr is None


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_prv_noise_at_rate_one_meets_the_exact_gaussian_bound(epsilon: float) -> None:
    """At q = 1, T steps of sigma are one Gaussian mechanism with mu = sqrt(T) / sigma.

    Its exact delta(epsilon) (Balle & Wang 2018) must be at most the target delta for
    the noise the PRV accountant plans, and the RDP plan must be noisier (looser).
    """
    from fl_imaging.privacy.accounting import noise_for_budget

    def cdf(x: float) -> float:  # standard normal
        return 0.5 * math.erfc(-x / math.sqrt(2))

    steps, delta = 20, 1e-5
    plans = {
        acc: noise_for_budget(
            history=[], epsilon=epsilon, delta=delta, sample_rate=1.0, steps=steps, accountant=acc
        )
        for acc in ("prv", "rdp")
    }
    mu = math.sqrt(steps) / plans["prv"]
    exact = cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * cdf(-epsilon / mu - mu / 2)
    assert exact <= delta * 1.001
    assert exact >= 0.5 * delta  # and it is not wasteful
    assert plans["rdp"] > plans["prv"]


def test_the_plan_warns_about_adam_and_high_noise_only() -> None:
    from fl_imaging.privacy.planning import plan_site

    def plan(batch: int, epsilon: float, optimizer: str) -> list[str]:
        return plan_site(
            site="s",
            num_train=119,
            batch_size=batch,
            epochs=2,
            rounds=10,
            epsilon=epsilon,
            delta=1e-5,
            accountant="rdp",
            num_weights=151_202,
            optimizer=optimizer,
        ).warnings()

    assert plan(16, 8.0, "sgd") == []  # the recipe at B_float's size: 0.08 clipping norms
    [adam] = plan(16, 8.0, "adam")
    assert "train.optimizer=adam under DP-SGD" in adam
    [noisy] = plan(2, 0.5, "sgd")
    assert "the noise on each averaged gradient is" in noisy and "train.batch_size=0" in noisy
    assert "model.init_checkpoint (make synthetic-start" in noisy  # the privacy-free start
    recipe = plan_site(
        site="s",
        num_train=119,
        batch_size=16,
        epochs=2,
        rounds=10,
        epsilon=8.0,
        delta=1e-5,
        accountant="rdp",
        num_weights=151_202,
    )
    assert recipe.noise_norm == pytest.approx(recipe.noise_to_signal * math.sqrt(151_202))


def test_the_runs_signal_to_noise_moves_with_epsilon_not_with_batch_or_epochs() -> None:
    from fl_imaging.privacy.planning import SitePrivacyPlan, plan_lines, plan_site

    def plan(batch: int, epochs: int, epsilon: float) -> SitePrivacyPlan:
        return plan_site(
            site="s",
            num_train=119,
            batch_size=batch,
            epochs=epochs,
            rounds=10,
            epsilon=epsilon,
            delta=1e-5,
            accountant="rdp",
            num_weights=151_202,
        )

    def snr(site: SitePrivacyPlan) -> float:
        assert site.noise_multiplier is not None
        # recomputed from the plan's own sigma: sqrt(T) * q N / (sigma * sqrt(weights))
        expected = (
            math.sqrt(site.total_steps)
            * site.sample_rate
            * 119
            / (site.noise_multiplier * math.sqrt(151_202))
        )
        assert site.run_signal_to_noise == pytest.approx(expected)
        assert f"{expected:.3f}" in plan_lines([site])[1].split()
        return expected

    recipe_plan = plan(16, 2, 8.0)
    recipe = snr(recipe_plan)
    # twice the batch, half or 2.5 times the steps, every case in each step: the
    # accountant's larger or smaller sigma takes back nearly all of what they change
    for batch, epochs in ((32, 2), (16, 1), (16, 5), (119, 2)):
        assert 0.7 < snr(plan(batch, epochs, 8.0)) / recipe < 1.4
    assert snr(plan(16, 2, 1.0)) < recipe / 4  # epsilon does move it
    unknown = dataclasses.replace(recipe_plan, num_weights=0)
    assert unknown.run_signal_to_noise is None  # without the weights' count


def test_a_recipe_is_checked_and_dp_sgd_refuses_a_fedprox_term() -> None:
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        LocalRecipe(epochs=0)
    with pytest.raises(ValueError, match="proximal_mu must be >= 0"):
        LocalRecipe(proximal_mu=-0.1)
    # the config refuses strategy=fedprox with private sites; train_private refuses too,
    # rather than train without the term
    with pytest.raises(ValueError, match="FedProx term"):
        train_private(
            _tiny_model(),
            _views_loader(cases=4, views=1, batch=4),
            LocalRecipe(proximal_mu=0.01),
            DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0),
            history=[],
        )


def test_class_weights_reach_the_loss_and_a_wrong_count_is_named() -> None:
    label = torch.zeros(1, 1, 4, 4, 4)
    label[..., :2, :2, :2] = 1
    label[..., 2:, 2:, 2:] = 2
    # right on both foreground classes, "class 1" wherever the truth is background
    logits = torch.full((1, 3, 4, 4, 4), -20.0)
    logits[:, 1] = torch.where(label[:, 0] == 2, -20.0, 20.0)
    logits[:, 2] = torch.where(label[:, 0] == 2, 20.0, -20.0)
    # unweighted: 48 background voxels wrong by 40 logits dominate the cross-entropy
    assert float(segmentation_loss()(logits, label)) > 10.0
    # background weighted 0: no cross-entropy left (every foreground voxel is right);
    # Dice losses: background 1 (weighted 0), class 1 1 - 2*8/(56+8) = 0.75 (predicted on
    # 56 voxels, 8 of them right), class 2 0; their weighted mean over 3 classes is 0.25
    assert float(segmentation_loss((0.0, 1.0, 1.0))(logits, label)) == pytest.approx(0.25, abs=1e-3)

    plan = compose("hippocampus_private", ["train.class_weights=[0.1,1,1]"])
    recipe = LocalRecipe.from_config(plan.train, epochs=1)
    assert recipe.class_weights == (0.1, 1.0, 1.0)
    wrong = "\n".join(validate(_unchecked("hippocampus_private", ["train.class_weights=[0.1,1]"])))
    assert "train.class_weights has 2 weights" in wrong and "anterior" in wrong
    negative = "\n".join(validate(_unchecked("demo", ["train.class_weights=[1,-1,1]"])))
    assert "train.class_weights must be finite and >= 0" in negative


def _first_step_gradient_of_case_0(
    spy: _ClipSpy, labels: torch.Tensor, class_weights: tuple[float, ...] | None
) -> list[torch.Tensor]:
    """Case 0's per-sample gradient, as Opacus clips it, in a first step over 2 cases."""
    spy.first_case.clear()
    torch.manual_seed(0)
    images = torch.randn(2, 1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    train_private(
        _tiny_model(),
        DataLoader(TensorDataset(images, labels), batch_size=2),
        LocalRecipe(epochs=1, lr=0.1, optimizer="sgd", class_weights=class_weights),
        DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp"),
        history=[],
    )
    return spy.first_case[0]


def test_a_patients_gradient_does_not_depend_on_another_patients_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With class weights, a cross-entropy averaged over the whole batch divides by the
    # batch's summed voxel weights: case 0's gradient would then scale with case 1's
    # labels, and one patient would change another's (unclipped) contribution.
    labels = torch.zeros(2, 1, 1, 8, 8, 8)
    labels[0, ..., :4, :4, :4] = 1
    mostly_background, mostly_foreground = labels.clone(), labels.clone()
    mostly_foreground[1, ..., :6, :, :] = 2
    spy = _ClipSpy(monkeypatch)
    for weights in ((0.1, 1.0, 1.0), (1.0, 1.0, 1.0), None):
        a = _first_step_gradient_of_case_0(spy, mostly_background, weights)
        b = _first_step_gradient_of_case_0(spy, mostly_foreground, weights)
        assert len(a) == len(b) > 0
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
