"""A site preprocesses its NIfTI files once and keeps them in its own state folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fl_imaging.config import ConfigError, RunPlan, compose
from fl_imaging.data.loading import ProcessMemory, train_dataset
from fl_imaging.data.manifest import TRAIN, VAL, Case
from fl_imaging.ml.models import new_model
from fl_imaging.site.resolve import Site, load_site_manifest, resolve_site
from fl_imaging.site.rounds import evaluate_round, train_round
from fl_imaging.site.state import cache_dir
from tests.conftest import tiny_overrides


def _cases(site: Site, plan: RunPlan, split: str) -> list[Case]:
    return list(load_site_manifest(site, plan).split(split))


def _cached(folder: Path | None) -> set[str]:
    assert folder is not None
    return {p.name for p in folder.glob("*.pt")}


def test_cache_lives_in_the_site_state_folder_per_split(tiny_plan: RunPlan) -> None:
    site = resolve_site({"partition-id": 0}, tiny_plan)
    weights = new_model(tiny_plan).state_dict()
    train_round(site, tiny_plan, weights, server_round=1)
    evaluate_round(site, tiny_plan, weights)
    train_dir, val_dir = cache_dir(site, tiny_plan, TRAIN), cache_dir(site, tiny_plan, VAL)
    assert train_dir is not None and train_dir.parent.parent == site.state_dir
    assert len(_cached(train_dir)) == len(_cases(site, tiny_plan, TRAIN))
    assert len(_cached(val_dir)) == len(_cases(site, tiny_plan, VAL))


def test_disk_cache_trains_exactly_like_the_memory_cache(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    losses = {}
    for cache in ("memory", "disk"):
        plan = compose(
            "demo", [*tiny_overrides(tiny_sites, tmp_path / cache), f"data.cache={cache}"]
        )
        site = resolve_site({"partition-id": 1}, plan)
        weights = new_model(plan).state_dict()
        rounds = [train_round(site, plan, weights, server_round=r) for r in (1, 2)]
        losses[cache] = [o.result.loss for o in rounds if o.result is not None]
    assert losses["disk"] == pytest.approx(losses["memory"], rel=1e-5)
    assert any((tmp_path / "disk" / "state").rglob("*.pt"))
    assert not any((tmp_path / "memory").rglob("*.pt"))


def test_a_changed_scan_is_preprocessed_again(tiny_plan: RunPlan) -> None:
    site = resolve_site({"partition-id": 0}, tiny_plan)
    weights = new_model(tiny_plan).state_dict()
    evaluate_round(site, tiny_plan, weights)
    before = _cached(cache_dir(site, tiny_plan, VAL))
    evaluate_round(site, tiny_plan, weights, validate_data=False)
    assert _cached(cache_dir(site, tiny_plan, VAL)) == before  # second read: from the cache
    image = _cases(site, tiny_plan, VAL)[0].images[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        evaluate_round(site, tiny_plan, weights, validate_data=False)
    finally:
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = _cached(cache_dir(site, tiny_plan, VAL))
    assert len(after - before) == 1


def test_preprocessing_settings_get_their_own_cache(tiny_sites: list[Path], tmp_path: Path) -> None:
    plans = [
        compose("demo", [*tiny_overrides(tiny_sites, tmp_path), f"data.spacing=[{s},{s},{s}]"])
        for s in (2.0, 3.0)
    ]
    dirs = [cache_dir(resolve_site({"partition-id": 0}, p), p, TRAIN) for p in plans]
    assert dirs[0] != dirs[1]


def test_unknown_cache_mode_is_a_config_error(tiny_sites: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.cache"):
        compose("demo", [*tiny_overrides(tiny_sites, tmp_path), "data.cache=ram"])


def test_memory_cache_serves_later_rounds_without_the_disk(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    """Cases read once stay in the process's memory; training is unchanged by it."""
    losses, refilled = {}, {}
    for memory_mb in (0, 64):
        plan = compose(
            "demo",
            [
                *tiny_overrides(tiny_sites, tmp_path / str(memory_mb)),
                f"data.memory_cache_mb={memory_mb}",
            ],
        )
        site = resolve_site({"partition-id": 1}, plan)
        weights = new_model(plan).state_dict()
        first = train_round(site, plan, weights, server_round=1)
        folder = cache_dir(site, plan, TRAIN)
        assert folder is not None and _cached(folder)
        for path in folder.glob("*.pt"):  # round 2 must not need the disk cache
            path.unlink()
        second = train_round(site, plan, weights, server_round=2, validate_data=False)
        losses[memory_mb] = [o.result.loss for o in (first, second) if o.result is not None]
        refilled[memory_mb] = bool(_cached(folder))
    assert refilled == {0: True, 64: False}
    assert losses[64] == pytest.approx(losses[0], rel=1e-6)


def test_process_memory_keeps_the_most_recent_cases_within_its_limit() -> None:
    memory = ProcessMemory()
    case = {"image": torch.zeros(256), "label": torch.zeros(256, dtype=torch.uint8)}  # 1280 B
    for key in ("a", "b", "c"):
        memory.put(key, case, limit_bytes=3000)
    assert memory.get("a") is None and memory.get("b") is case and memory.get("c") is case
    assert memory.nbytes == 2560 and len(memory) == 2
    assert memory.get("b") is case  # now "c" is the least recently used
    memory.put("d", case, limit_bytes=3000)
    assert memory.get("c") is None and memory.get("b") is case
    memory.put("huge", {"image": torch.zeros(1000)}, limit_bytes=3000)  # larger than the limit
    assert memory.get("huge") is None and len(memory) == 2


def test_negative_memory_cache_is_a_config_error(tiny_sites: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.memory_cache_mb"):
        compose("demo", [*tiny_overrides(tiny_sites, tmp_path), "data.memory_cache_mb=-1"])


def test_the_cache_stores_float16_images_and_uint8_labels_and_serves_float32(
    tiny_plan: RunPlan,
) -> None:
    from fl_imaging.data.loading import eval_loader

    site = resolve_site({"partition-id": 0}, tiny_plan)
    folder = cache_dir(site, tiny_plan, VAL)
    batch = next(iter(eval_loader(_cases(site, tiny_plan, VAL), tiny_plan.data, cache_dir=folder)))
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.float32
    assert folder is not None
    stored = torch.load(next(folder.glob("*.pt")), weights_only=False)
    assert stored["image"].dtype == torch.float16 and stored["label"].dtype == torch.uint8
    # what a site trains on differs from float32 only by the float16 rounding
    exact = compose(
        "demo",
        [
            f"paths.root={tiny_plan.paths.root}",
            "data.cache_dtype=float32",
            *[
                f"federation.sites.{i}.manifest={s.manifest}"
                for i, s in enumerate(tiny_plan.federation.sites)
            ],
            "data.patch_size=[16,16,16]",
        ],
    )
    full = next(iter(eval_loader(_cases(site, exact, VAL), exact.data, cache_dir=None)))
    assert torch.allclose(batch["image"], full["image"], atol=1e-3)
    assert torch.equal(batch["label"], full["label"])


def test_the_state_folder_with_patient_volumes_is_private_to_the_site_user(
    tiny_plan: RunPlan,
) -> None:
    # the audit: cached patient volumes in state/ were world-readable (0644)
    import stat

    site = resolve_site({"partition-id": 0}, tiny_plan)
    site.state_dir.mkdir(parents=True, mode=0o755)
    evaluate_round(site, tiny_plan, new_model(tiny_plan).state_dict())
    assert stat.S_IMODE(site.state_dir.stat().st_mode) == 0o700
    assert any(site.state_dir.rglob("*.pt"))  # the cache is inside it


def test_augment_false_serves_the_same_patch_every_time(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    # patches larger than the ~16^3 volumes: padded, so the random patch is the volume;
    # what can still change between draws is the augmentation
    draws = {}
    for augment in (True, False):
        plan = compose(
            "demo",
            [
                *tiny_overrides(tiny_sites, tmp_path / str(augment)),
                "data.patch_size=[24,24,24]",
                f"data.augment={str(augment).lower()}",
            ],
        )
        site = resolve_site({"partition-id": 0}, plan)
        dataset = train_dataset(_cases(site, plan, TRAIN)[:1], plan.data, seed=0)
        draws[augment] = [dataset[0][0]["image"] for _ in range(8)]
    assert all(torch.equal(d, draws[False][0]) for d in draws[False])
    assert not all(torch.equal(d, draws[True][0]) for d in draws[True])
