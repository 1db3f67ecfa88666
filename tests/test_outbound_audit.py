"""Every reply a site sends is in its own outbound audit log, with a hash the server can check,
and no array of any reply could hold an image or label volume of the site."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import pytest
from flwr.app import Message

from fl_imaging.config import RunPlan, compose, plan_to_yaml
from fl_imaging.data.manifest import load_manifest
from fl_imaging.ml.models import new_model
from fl_imaging.outputs.reporting import RunFolder
from fl_imaging.server import rounds as server
from fl_imaging.site.audit import read_audit
from fl_imaging.tools.cli import main
from fl_imaging.updates.wire import message_bytes
from tests.conftest import tiny_overrides
from tests.local_grid import LocalGrid


class InterceptingGrid(LocalGrid):
    """Notes every reply as the server receives it: (site node, content hash, bytes)."""

    def __init__(self, overrides: list[str]) -> None:
        super().__init__(overrides)
        self.seen: list[tuple[int, str, int]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:  # before the server decodes or edits anything
            self.seen.append(
                (reply.metadata.src_node_id, reply.content.object_id, message_bytes(reply))
            )
        return replies


def volume_shapes(plan: RunPlan) -> set[tuple[int, ...]]:
    """Spatial shapes of every image and label of every site, and of the training patch."""
    shapes = {tuple(plan.data.patch_size)}
    for site in plan.federation.sites:
        for case in load_manifest(plan.resolve_path(site.manifest)).cases:
            for path in (*case.images, case.label):
                shapes.add(tuple(nib.load(str(path)).shape[:3]))
    return shapes


@pytest.mark.parametrize(
    "extra",
    [[], ["federation.sites.0.privacy.epsilon=8", "privacy.delta=1e-3"], ["compression=int8"]],
    ids=["plain", "private", "compressed"],
)
def test_every_reply_is_logged_at_its_site_with_the_hash_the_server_sees(
    extra: list[str], tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    overrides = [*tiny_overrides(tiny_sites, tmp_path), "rounds=2", *extra]
    plan = compose("demo", overrides)
    grid = InterceptingGrid(overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    server.run_federation(grid, plan, run, run_id=1)

    shapes = volume_shapes(plan)
    weights = sum(t.numel() for t in new_model(plan).state_dict().values())
    logged: list[tuple[int, str, int]] = []
    for node, site in enumerate(plan.federation.sites, start=1):
        entries = list(read_audit(plan.site_state_dir(site)))
        assert entries and all(e["site"] == site.name for e in entries)
        logged += [(node, e["sha256"], e["bytes"]) for e in entries]
        for entry in entries:
            elements = 0
            for record in entry["arrays"].values():
                for name, shape in record.items():
                    assert tuple(shape[-3:]) not in shapes, (site.name, name, shape)
                    elements += math.prod(shape)
            # no more numbers than the model's weights (plus the int8 codec's block scales)
            assert elements <= weights * (1 + 1 / 256) + 64, (site.name, entry["message_type"])
        reports_epsilon = any("epsilon_spent" in e for e in entries)
        assert reports_epsilon == (site.name == "hospital_a" and "privacy.delta=1e-3" in extra)
    assert sorted(logged) == sorted(grid.seen)  # every reply, nothing else, same hash and size


def test_site_audit_prints_one_line_per_reply(
    tiny_sites: list[Path],
    tmp_path: Path,
    task_identity: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    overrides = [*tiny_overrides(tiny_sites, tmp_path), "rounds=1", "strategy.cross_site_epochs=0"]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    server.run_federation(LocalGrid(overrides), plan, run, run_id=1)
    state = plan.site_state_dir(plan.federation.sites[1])
    assert main(["site", "audit", "--state-dir", str(state)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["time", "run", "round", "type"]
    # named once, trained once (its update and the round-0 validation), evaluated once
    assert [line.split()[3] for line in lines[1:]] == ["query", "train", "evaluate"]
