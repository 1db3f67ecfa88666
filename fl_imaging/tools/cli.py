r"""The ``fl-imaging`` command: make data, check it, split it, run a federation, report.

Examples::

    fl-imaging synth --out data/synthetic                 # 3 virtual hospitals
    fl-imaging check-data data/synthetic/hospital_a/dataset.json
    fl-imaging partition --dataset D/dataset.json --metadata D/cases.csv \\
        --by-column pseudo_site --out data_manifests/hippocampus --data-root D
    fl-imaging check-config experiment=hippocampus strategy=fedprox
    fl-imaging run experiment=demo rounds=3               # flwr run . on a local simulation
    fl-imaging sweep -m experiment=demo strategy=fedavg,fedprox rounds=3
    fl-imaging predict --checkpoint outputs/latest/checkpoints/best.pt --input scan.nii.gz \\
        --output scan_seg.nii.gz
    fl-imaging report outputs/latest
    fl-imaging site approve path/to/reviewed/app --to state/approved_bundles.txt
    fl-imaging site fingerprint certs/supernodes/hospital_a.pub
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fl_imaging.config import split_experiment, with_root
from fl_imaging.logs import setup_logging

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _synth(args: argparse.Namespace) -> int:
    from fl_imaging.data.synthetic import generate_federation

    manifests = generate_federation(
        args.out,
        num_sites=args.sites,
        total_cases=args.cases,
        skew=args.skew,
        fov_mm=args.fov_mm,
        modalities=tuple(args.modalities),
        seed=args.seed,
        overwrite=args.overwrite,
        modality_layout=args.layout,
        val_fraction=args.val_fraction,
        label_scheme=args.label_scheme,
    )
    for path in manifests:
        print(path)
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from fl_imaging.data.manifest import ManifestError, check_manifest, load_manifest

    failed = 0
    for manifest_path in args.manifests:
        try:
            manifest = load_manifest(manifest_path, data_root=args.data_root)
        except ManifestError as exc:
            print(f"FAIL {exc}")
            failed += 1
            continue
        print(
            f"{manifest.path}: {manifest.name}, {len(manifest.cases)} cases "
            f"({len(manifest.split('train'))} train, {len(manifest.split('val'))} val), "
            f"modalities {list(manifest.modalities)}, labels {dict(manifest.labels)}"
        )
        bad = 0
        for report in check_manifest(manifest):
            if report.ok:
                if args.verbose:
                    print(f"  ok   {report.case_id} shape {report.shape} spacing {report.spacing}")
            else:
                bad += 1
                for problem in report.problems:
                    print(f"  FAIL {report.case_id}: {problem}")
        print(f"  {len(manifest.cases) - bad} ok, {bad} with problems")
        failed += bad
    return 1 if failed else 0


def _partition(args: argparse.Namespace) -> int:
    from fl_imaging.data.partition import partition_by_column, partition_random

    if args.by_column:
        if not args.metadata:
            print("--by-column needs --metadata CSV", file=sys.stderr)
            return 2
        paths = partition_by_column(
            args.dataset,
            args.metadata,
            args.by_column,
            out_dir=args.out,
            val_fraction=args.val_fraction,
            seed=args.seed,
            data_root=args.data_root,
        )
    else:
        paths = partition_random(
            args.dataset,
            args.random,
            out_dir=args.out,
            skew=args.skew,
            val_fraction=args.val_fraction,
            seed=args.seed,
            data_root=args.data_root,
        )
    for path in paths:
        print(path)
    return 0


def _run(args: argparse.Namespace) -> int:
    from fl_imaging.tools.launch import run_simulation

    experiment, overrides = split_experiment(args.overrides)
    outcome = run_simulation(experiment, overrides, project_root=args.app, verbose=args.verbose)
    print(f"run {outcome.run_id}: {outcome.status} in {outcome.seconds:.0f} s")
    print(f"run folder: {outcome.run_dir}")
    return 0 if outcome.ok else 1


def _check_config(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from fl_imaging.config import compose_dictconfig, to_plan, validate
    from fl_imaging.server.strategies import strategy_problems
    from fl_imaging.site.resolve import check_sites

    experiment, overrides = split_experiment(args.overrides)
    overrides = with_root(overrides, Path.cwd())
    cfg = compose_dictconfig(experiment, overrides)
    plan = to_plan(cfg, check=False)
    print(OmegaConf.to_yaml(cfg, resolve=True))
    problems = validate(plan) + check_sites(plan) + strategy_problems(plan)
    if problems:
        print(f"{len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"config OK: experiment {experiment!r}, {len(plan.federation.sites)} sites")
    return 0


def _stop_superlink(args: argparse.Namespace) -> int:
    from fl_imaging.tools.launch import flwr_env, local_superlink_pids
    from fl_imaging.tools.processes import stop_processes

    home = Path(flwr_env(args.app)["FLWR_HOME"])
    pids = local_superlink_pids(home)
    stop_processes(pids)
    print(f"stopped {len(pids)} process(es) of the local SuperLink of {home}")
    return 0


def _privacy_sites(args: argparse.Namespace) -> list[tuple[str, Path, float | None]]:
    from fl_imaging.config import compose
    from fl_imaging.site.resolve import configured_sites

    experiment, overrides = split_experiment(args.overrides)
    overrides = with_root(overrides, Path.cwd())
    plan = compose(experiment, overrides)
    return [(s.name, s.state_dir, s.config.privacy.epsilon) for s in configured_sites(plan)]


def _privacy_status(args: argparse.Namespace) -> int:
    from fl_imaging.privacy.ledger import LedgerError, ledger_path, read_ledger

    print(f"{'site':<20} {'budget':>8} {'spent':>8} {'left':>8} {'delta':>9} rounds  ledger")
    problems = 0
    for name, state_dir, configured in _privacy_sites(args):
        try:
            ledger = read_ledger(state_dir)
        except LedgerError as exc:
            problems += 1
            print(f"{name:<20} {'?':>8} {'?':>8} {'?':>8} {'?':>9} {'?':>6}  REFUSED: {exc}")
            continue
        if ledger is None:
            budget = "no DP" if configured is None else f"{configured:g}"
            print(f"{name:<20} {budget:>8} {'0':>8} {'-':>8} {'-':>9} {0:>6}  (none yet)")
            continue
        spent = ledger.epsilon_spent
        print(
            f"{name:<20} {ledger.epsilon_budget:>8g} {spent:>8.3f} "
            f"{max(ledger.epsilon_budget - spent, 0):>8.3f} {ledger.delta:>9.2g} "
            f"{len(ledger.rounds):>6}  {ledger_path(state_dir)}"
        )
    return 1 if problems else 0


def _privacy_plan(args: argparse.Namespace) -> int:
    from fl_imaging.config import compose
    from fl_imaging.privacy.planning import plan_lines
    from fl_imaging.privacy.requests import privacy_plans

    experiment, overrides = split_experiment(args.overrides)
    plans = privacy_plans(compose(experiment, with_root(overrides, Path.cwd())))
    if not plans:
        print(f"experiment {experiment!r} has no private site (no federation.sites[*].privacy)")
        return 0
    for line in plan_lines(plans):
        print(line)
    return 0


def _privacy_audit(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from fl_imaging.config import to_plan
    from fl_imaging.outputs.reporting import (
        CheckpointReadError,
        load_checkpoint,
        read_summary,
        write_privacy_audit,
        write_report,
    )
    from fl_imaging.site.resolve import configured_sites
    from fl_imaging.site.rounds import membership_audit

    run_dir = Path(args.run_dir).resolve()
    checkpoint = run_dir / "checkpoints" / f"{args.checkpoint}.pt"
    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    plan = to_plan(OmegaConf.load(run_dir / "config.yaml"), check=False)
    sites = [s for s in configured_sites(plan) if not args.site or s.name in args.site]
    unknown = sorted(set(args.site or ()) - {s.name for s in sites})
    if unknown:
        print(
            f"error: {unknown} are not sites of {run_dir.name}: {plan.site_names}", file=sys.stderr
        )
        return 2
    spent = read_summary(run_dir).get("epsilon_spent_per_site") or {}
    print(f"membership-inference audit of {checkpoint} (loss threshold; AUC 0.5 = chance)")
    print(f"{'site':<18} {'AUC':>6} {'95 % interval':>14} {'train/val cases':>16} {'epsilon':>8}")
    rows = []
    for site in sites:
        result = membership_audit(site, plan, ckpt["state_dict"], resamples=args.resamples)
        rows.append(result.to_dict())
        eps = spent.get(site.name)
        print(
            f"{site.name:<18} {result.auc:>6.3f} {result.low:>6.3f}-{result.high:<7.3f} "
            f"{result.members:>7} / {result.non_members:<6} "
            f"{'-' if eps is None else f'{eps:.2f}':>8}"
            f"{'  (too few cases for a meaningful AUC)' * result.few_cases}"
        )
    write_privacy_audit(run_dir, rows, checkpoint.name)
    write_report(run_dir)
    print(
        "evidence, not a proof: epsilon bounds every attack; this is one simple attack. "
        f"Added to {run_dir / 'report.md'}"
    )
    return 0


def _privacy_reset(args: argparse.Namespace) -> int:
    import getpass

    from fl_imaging.privacy.ledger import (
        LedgerError,
        has_ledger,
        ledger_lock,
        read_ledger,
        reset_ledger,
    )

    sites = {name: state_dir for name, state_dir, _ in _privacy_sites(args)}
    if args.site not in sites:
        print(f"error: unknown site {args.site!r}; configured: {', '.join(sites)}", file=sys.stderr)
        return 2
    state_dir = sites[args.site]
    if not has_ledger(state_dir):
        print(f"site {args.site}: no privacy ledger in {state_dir}; nothing to reset")
        return 0
    try:
        ledger = read_ledger(state_dir)
        found = (
            f"spent epsilon {ledger.epsilon_spent:.3f} of {ledger.epsilon_budget:g} over "
            f"{len(ledger.rounds)} rounds"
            if ledger is not None
            else "no ledger"
        )
    except LedgerError as exc:
        found = f"its ledger is refused ({exc})"
    print(
        f"site {args.site}: {found}. Resetting lets the site spend its budget again on the "
        f"same patients: only do this for new data or a new privacy policy."
    )
    if not args.yes:
        answer = input(f"Type the site name ({args.site}) to confirm: ").strip()
        if answer != args.site:
            print("not reset")
            return 1
    # never while a private round of this site is running
    with ledger_lock(state_dir, site=args.site, timeout=10):
        archive = reset_ledger(state_dir, operator=getpass.getuser(), reason=args.reason)
    print(
        f"reset; old ledger kept as {archive}, audit trail in {state_dir / 'privacy_audit.jsonl'}"
    )
    return 0


def _site_approve(args: argparse.Namespace) -> int:
    import datetime

    from fl_imaging.tools.bundle import bundle_hash, fab_bytes, read_approved

    digest = bundle_hash(fab_bytes(args.bundle))
    note = args.note or f"{args.bundle.resolve().name} approved {datetime.date.today().isoformat()}"
    line = f"{digest}  {note}"
    if args.to is None:
        print(line)
        return 0
    if args.to.is_file() and digest in read_approved(args.to):
        print(f"{digest} is already approved in {args.to}")
        return 0
    args.to.parent.mkdir(parents=True, exist_ok=True)
    with args.to.open("a", encoding="utf-8") as out:
        out.write(line + "\n")
    print(f"approved {digest} in {args.to}")
    return 0


def _site_fingerprint(args: argparse.Namespace) -> int:
    from fl_imaging.server.identity import IdentityError, file_fingerprint

    for key in args.keys:
        try:
            print(f"{file_fingerprint(key)}  {key}")
        except IdentityError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def _gateway(args: argparse.Namespace) -> int:
    from fl_imaging.tools.gateway import Upstream, serve

    upstream = Upstream(args.superlink, args.insecure, args.root_certificates)
    serve(args.listen, upstream, args.ssl_certfile, args.ssl_keyfile)
    return 0


def _site_audit(args: argparse.Namespace) -> int:
    import json

    from fl_imaging.site.audit import AUDIT_LOG, audit_table, read_audit

    if args.state_dir is None:
        sites = {name: state for name, state, _ in _privacy_sites(args)}
        if args.site not in sites:
            print(
                f"error: give --state-dir, or --site with one of {', '.join(sites)}",
                file=sys.stderr,
            )
            return 2
        state_dir = sites[args.site]
    else:
        state_dir = args.state_dir
    entries = list(read_audit(state_dir))
    if not entries:
        print(f"no replies logged in {state_dir / AUDIT_LOG}")
        return 0
    for line in (json.dumps(e) for e in entries) if args.json else audit_table(entries):
        print(line)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import nibabel as nib
    import numpy as np
    import torch

    from fl_imaging.data.regions import region_metrics, regions_of
    from fl_imaging.tools.inference import dice_per_label, load_predictor, predict_file, scans_in

    predictor = load_predictor(args.checkpoint, allow_untrained=args.allow_untrained)
    if len(args.input) > 1:  # one case, one 3D file per modality (in the model's order)
        cases: list[list[Path]] = [list(args.input)]
    else:
        cases = [[scan] for scan in scans_in(args.input[0])]
    single = len(cases) == 1 and not args.input[0].is_dir()
    for files in cases:
        scan = files[0]
        out = args.output if single and not args.output.is_dir() else args.output / scan.name
        pred = predict_file(predictor, files, out)
        line = f"{' + '.join(str(f) for f in files)} -> {out}"
        if args.label is not None:
            label_path = args.label if single and args.label.is_file() else args.label / scan.name
            label_img = nib.load(str(label_path))
            label = np.asarray(label_img.dataobj).round().astype(np.int64)
            dice = dice_per_label(pred, label, predictor.labels)
            line += " | Dice " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
            regions = regions_of(predictor.plan.data.label_scheme)
            if regions:  # on the scan's own grid, in mm
                found = region_metrics(
                    torch.as_tensor(pred),
                    torch.as_tensor(label),
                    regions,
                    label_img.header.get_zooms()[:3],
                )
                line += " | regions " + ", ".join(
                    f"{r} Dice {d:.3f} HD95 {h:.1f} mm" for r, (d, h) in found.items()
                )
        print(line)
    return 0


def _report(args: argparse.Namespace) -> int:
    from fl_imaging.outputs.overlays import report_with_overlays
    from fl_imaging.outputs.reporting import read_summary

    run_dir = Path(args.run_dir).resolve()
    print(report_with_overlays(run_dir, overlays=not args.no_overlays))
    summary = read_summary(run_dir)
    status = summary.get("status")
    if status == "running":
        age = time.time() - (run_dir / "summary.json").stat().st_mtime
        print(
            f"warning: summary.json says the run is still running, but it was last written "
            f"{age / 60:.0f} min ago: if no process runs it any more, it crashed (resume it "
            f"with resume={run_dir})",
            file=sys.stderr,
        )
    elif status not in ("finished", None):
        why = summary.get("failed_sites") or summary.get("error", "")
        print(f"warning: the run's status is {status!r}: {why}", file=sys.stderr)
    return 0 if status in ("finished", None) else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fl-imaging``."""
    parser = argparse.ArgumentParser(
        prog="fl-imaging", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(sub)
    _add_run_commands(sub)
    _add_privacy_commands(sub)
    _add_site_commands(sub)
    _add_model_commands(sub)
    return parser


def _add_data_commands(sub: Any) -> None:
    """Synth, check-data, partition: a hospital's data."""
    p = sub.add_parser("synth", help="write synthetic hospitals (NIfTI + one manifest each)")
    p.add_argument("--out", type=Path, default=Path("data/synthetic"))
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--cases", type=int, default=48, help="total cases over all sites")
    p.add_argument("--skew", type=float, default=0.5, help="site size skew (0: equal sizes)")
    p.add_argument("--fov-mm", type=float, default=64.0, help="field of view per axis in mm")
    p.add_argument("--modalities", nargs="+", default=["T1"], help="e.g. T1c FLAIR")
    p.add_argument(
        "--layout",
        choices=["4d", "files"],
        default="4d",
        help="multi-modal images as one 4D file or one file per modality",
    )
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument(
        "--label-scheme",
        choices=["exclusive", "brats2021", "brats2023", "msd_task01"],
        default="exclusive",
        help="label values: 1 oedema 2 core (exclusive), or a BraTS convention "
        "(brats2021: 1 necrosis, 2 oedema, 4 enhancing rim)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_synth)

    p = sub.add_parser("check-data", help="read and check every case of manifests")
    p.add_argument("manifests", nargs="+", type=Path)
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder the manifest paths are relative to (overrides the manifest's)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="list good cases too")
    p.set_defaults(func=_check_data)

    p = sub.add_parser("partition", help="split an MSD-style dataset into per-site manifests")
    p.add_argument("--dataset", type=Path, required=True, help="the dataset.json")
    p.add_argument("--out", type=Path, required=True, help="folder for <site>.json manifests")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--by-column", help="metadata column naming each case's site")
    how.add_argument("--random", type=int, metavar="N", help="seeded random split into N sites")
    p.add_argument("--metadata", type=Path, help="CSV with one row per case (for --by-column)")
    p.add_argument("--skew", type=float, default=0.0, help="size skew for --random")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data-root",
        default=None,
        help="store paths relative to this dataset root (else absolute paths)",
    )
    p.set_defaults(func=_partition)


def _add_run_commands(sub: Any) -> None:
    """Run, check-config, sweep, stop-superlink: running a federation."""
    p = sub.add_parser("run", help="run a federation on a local simulation (flwr run)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="experiment=NAME and Hydra overrides, e.g. experiment=demo rounds=3",
    )
    p.add_argument("--app", type=Path, default=PROJECT_ROOT, help="the app folder")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="every line of Flower's stream (always kept in the run's console.log)",
    )
    p.set_defaults(func=_run)

    p = sub.add_parser(
        "check-config", help="print the resolved config and every problem in it (and its sites)"
    )
    p.add_argument("overrides", nargs="*", help="experiment=NAME and Hydra overrides")
    p.set_defaults(func=_check_config)

    sub.add_parser(
        "sweep",
        help="Hydra multirun: one federated run per job, then sweep_summary.csv "
        "(e.g. fl-imaging sweep -m experiment=hippocampus strategy=fedavg,fedprox)",
    )

    p = sub.add_parser(
        "stop-superlink", help="stop the local SuperLink that a plain `flwr run .` left running"
    )
    p.add_argument("--app", type=Path, default=PROJECT_ROOT, help="the app folder")
    p.set_defaults(func=_stop_superlink)


def _add_privacy_commands(sub: Any) -> None:
    """Privacy status | plan | audit | reset."""
    privacy = sub.add_parser("privacy", help="per-site privacy ledgers: status, reset")
    psub = privacy.add_subparsers(dest="privacy_command", required=True)
    p = psub.add_parser("status", help="epsilon spent and left per site")
    p.add_argument("overrides", nargs="*", help="experiment=NAME and Hydra overrides")
    p.set_defaults(func=_privacy_status)
    p = psub.add_parser("plan", help="before training: each private site's DP-SGD plan")
    p.add_argument("overrides", nargs="*", help="experiment=NAME and Hydra overrides")
    p.set_defaults(func=_privacy_plan)
    p = psub.add_parser(
        "audit", help="membership-inference attack on a run's final model at each site (AUC)"
    )
    p.add_argument("run_dir", type=Path, help="the run folder (outputs/<run>)")
    p.add_argument("--site", nargs="*", help="only these sites (default: every site of the run)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.set_defaults(func=_privacy_audit)
    p = psub.add_parser("reset", help="archive a site's ledger (asks to confirm, audited)")
    p.add_argument("--site", required=True)
    p.add_argument("--reason", default="", help="recorded in the audit trail")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("overrides", nargs="*", help="experiment=NAME and Hydra overrides")
    p.set_defaults(func=_privacy_reset)


def _add_site_commands(sub: Any) -> None:
    """Site audit | approve | fingerprint, and the coordinator's gateway."""
    site = sub.add_parser("site", help="a hospital's own view: what its site sent")
    ssub = site.add_subparsers(dest="site_command", required=True)
    p = ssub.add_parser("audit", help="every reply the site sent (its outbound audit log)")
    p.add_argument("--state-dir", type=Path, help="the site's state folder (deployment)")
    p.add_argument("--site", help="a configured site (its state folder from the config)")
    p.add_argument("--json", action="store_true", help="the raw JSON lines")
    p.add_argument("overrides", nargs="*", help="experiment=NAME and Hydra overrides")
    p.set_defaults(func=_site_audit)
    p = ssub.add_parser(
        "approve", help="the hash of an app bundle (.fab or app folder) this hospital accepts"
    )
    p.add_argument("bundle", type=Path, help="a .fab file, or the reviewed app's source folder")
    p.add_argument("--to", type=Path, help="append it to this approved-bundles file")
    p.add_argument("--note", help="what was reviewed (kept next to the hash)")
    p.set_defaults(func=_site_approve)
    p = ssub.add_parser(
        "fingerprint", help="SHA-256 of a SuperNode public key (for federation.site_keys)"
    )
    p.add_argument("keys", type=Path, nargs="+", help="public key files (OpenSSH .pub or PEM)")
    p.set_defaults(func=_site_fingerprint)

    p = sub.add_parser(
        "gateway", help="coordinator: expose only the Fleet API of a SuperLink to hospitals"
    )
    p.add_argument("--listen", required=True, help="host:port the hospitals connect to")
    p.add_argument("--superlink", required=True, help="host:port of the SuperLink (loopback)")
    p.add_argument("--ssl-certfile", help="the certificate hospitals verify (SuperLink's)")
    p.add_argument("--ssl-keyfile", help="its private key")
    p.add_argument("--root-certificates", help="CA that signed the SuperLink's certificate")
    p.add_argument("--insecure", action="store_true", help="plain HTTP on both sides")
    p.set_defaults(func=_gateway)


def _add_model_commands(sub: Any) -> None:
    """Predict and report: using a run's model and results."""
    p = sub.add_parser("predict", help="segment NIfTI scans with a run's checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="e.g. RUN/checkpoints/best.pt")
    p.add_argument(
        "--input",
        type=Path,
        nargs="+",
        required=True,
        help="a NIfTI scan (3D, or 4D channels last), a folder of them, or one 3D "
        "file per modality of one case, in the training order",
    )
    p.add_argument(
        "--output",
        type=Path,
        required=True,
        help="output file (single scan) or folder (same file names)",
    )
    p.add_argument(
        "--label",
        type=Path,
        default=None,
        help="ground truth (file, or folder of same names): report Dice",
    )
    p.add_argument(
        "--allow-untrained",
        action="store_true",
        help="accept a round-0 checkpoint or a failed run's (else refused)",
    )
    p.set_defaults(func=_predict)

    p = sub.add_parser(
        "report", help="(re)write a run's report: report/index.html (plots, overlays) + report.md"
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--no-overlays", action="store_true", help="skip reading scans for overlays")
    p.set_defaults(func=_report)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fl-imaging`` console script."""
    setup_logging(logging.INFO)
    argv = list(sys.argv[1:] if argv is None else argv)
    from fl_imaging.config import ConfigError
    from fl_imaging.data.manifest import ManifestError

    if argv[:1] == ["sweep"]:  # Hydra parses a sweep's arguments itself (-m, overrides)
        from fl_imaging.tools.sweep import sweep

        return sweep(argv[1:], PROJECT_ROOT)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, ManifestError, FileExistsError, FileNotFoundError, ValueError) as exc:
        # LedgerError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
