"""A hospital runs only the app bundles it approved (finding 2 of the security audit).

The coordinator's bundle is the code every site runs. The hospital's executor checks each
bundle's SHA-256 against the hospital's own list before Flower installs any of it.
"""

from __future__ import annotations

import importlib.util
import shutil
import types
from pathlib import Path

import pytest

from fl_imaging.tools.bundle import (
    BundleNotApprovedError,
    bundle_hash,
    check_approved,
    fab_bytes,
    read_approved,
    stage_app,
)
from fl_imaging.tools.cli import main
from tests.conftest import REPO_ROOT


def warm_executor() -> types.ModuleType:
    path = REPO_ROOT / "scripts" / "deploy" / "warm_executor.py"
    spec = importlib.util.spec_from_file_location("warm_executor_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of this app's source, as a hospital would review it."""
    return stage_app(REPO_ROOT, tmp_path_factory.mktemp("reviewed"))


def test_approve_prints_the_hash_of_the_bundle_flwr_run_builds_and_any_edit_changes_it(
    app: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flwr.cli.build import build_fab_from_disk

    assert main(["site", "approve", str(app), "--note", "v0.1 reviewed"]) == 0
    digest, note = capsys.readouterr().out.split(maxsplit=1)
    assert digest == bundle_hash(build_fab_from_disk(app))  # what `flwr run <app>` sends
    assert note.strip() == "v0.1 reviewed"
    assert bundle_hash(fab_bytes(app)) == digest  # deterministic: built again, same bytes
    edited = shutil.copytree(app, tmp_path / "edited")
    with (edited / "fl_imaging" / "apps" / "client_app.py").open("a") as source:
        source.write("\n# one more line\n")
    assert bundle_hash(fab_bytes(edited)) != digest


def test_approve_appends_to_the_hospitals_list_once(app: Path, tmp_path: Path) -> None:
    approved = tmp_path / "approved_bundles.txt"
    assert main(["site", "approve", str(app), "--to", str(approved)]) == 0
    assert main(["site", "approve", str(app), "--to", str(approved)]) == 0
    assert list(read_approved(approved)) == [bundle_hash(fab_bytes(app))]


def test_a_malformed_list_is_refused_naming_the_file_and_line(tmp_path: Path) -> None:
    approved = tmp_path / "approved.txt"
    approved.write_text(f"# reviewed bundles\n{'a' * 64}  v1\nsha256:abcd\n")
    with pytest.raises(ValueError, match=r"approved.txt:3: expected a 64-digit SHA-256"):
        read_approved(approved)


def test_the_executor_refuses_an_unapproved_bundle_before_flower_installs_it(
    tmp_path: Path,
) -> None:
    approved = tmp_path / "approved.txt"
    good, bad = b"the reviewed bundle", b"the reviewed bundle, modified"
    approved.write_text(f"{bundle_hash(good)}  reviewed\n")
    installed: list[bytes] = []
    runtime = types.SimpleNamespace(install_from_fab=lambda content, **_: installed.append(content))

    warm_executor().approve_before_install(runtime, approved)

    with pytest.raises(BundleNotApprovedError, match=bundle_hash(bad)) as refused:
        runtime.install_from_fab(bad, skip_prompt=True)
    assert "nothing of it was installed or run" in str(refused.value)
    assert installed == []
    runtime.install_from_fab(good, skip_prompt=True)
    assert installed == [good]


def test_a_hash_added_later_is_honoured_without_a_restart(tmp_path: Path) -> None:
    approved = tmp_path / "approved.txt"
    approved.write_text("")
    with pytest.raises(BundleNotApprovedError):
        check_approved(b"v2", approved)
    approved.write_text(f"{bundle_hash(b'v2')}  v2 reviewed\n")
    assert check_approved(b"v2", approved) == bundle_hash(b"v2")
