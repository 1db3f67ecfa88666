#!/usr/bin/env bash
# make test-docker: the shipped compose.yaml, started for real, runs a federation.
#
# Starts a private Docker daemon (scripts/docker/dockerd.sh), makes a Debian bookworm base
# image locally (mmdebstrap + docker import; no registry needed), builds the Dockerfile on it
# with the CPU torch wheel found on this machine, makes the CA, SuperLink certificate and
# hospital keys (scripts/deploy/make_certs.py) and brings up compose.yaml as it ships: the
# SuperLink, the one-off key registration and three hospital containers (synthetic hospitals
# a, b and c; each its own data read-only at /data, its own state volume at /state; TLS and
# SuperNode authentication; warm ClientApp executors). Then:
#   1. `flwr run . <federation>` for 2 tiny rounds (hospital_a with DP-SGD, epsilon 8); the
#      run folder (copied out of the SuperLink's /state) must say finished, 2 rounds, 3 sites;
#   2. the SuperLink container is restarted (`docker restart`); the hospitals must reconnect
#      by themselves and `resume=latest rounds=3` must finish round 3: every round once in
#      metrics.jsonl; hospital_a's privacy ledger (in its /state, owned by the containers'
#      user) charges the 2 rounds it trained, agrees with the summary's epsilon (at most 8),
#      and in round 3 its budget (planned over the first run's rounds) is exhausted;
#   3. every container's /data is read-only and no container runs as root;
#   4. `docker-compose down -v` leaves no container, volume or network of the project.
# Everything it started (containers, volumes, daemon, mounts, temporary files) is removed on
# exit, also on failure. Prints one JSON line with the timings, the image size, each round's
# wall time (train phase + aggregation, from summary.json round_seconds) and the overrides.
#
# Needs root, the docker.io, docker-compose (or Compose v2) and mmdebstrap packages, network
# access to the Debian mirror and the Python package index, and the project's .venv.
#   FL_IMAGING_TORCH_WHEEL   the torch==2.13.0+cpu wheel (default: searched in pip's find-links)
#   FL_IMAGING_DOCKER_CACHE  where the base image tarball is kept (default /var/tmp/fl-imaging-docker)
#   FL_IMAGING_DOCKER_PORT   the SuperLink's port on 127.0.0.1 (default 47090)
#   FL_IMAGING_DOCKER_ROUNDS rounds of the first run (default 2; the resumed run adds one)
#   FL_IMAGING_ISOLATION     warm (default) or subprocess: the hospitals' ClientApp processes
#   FL_IMAGING_DOCKER_KEEP=1 keep the work folder (logs, run folder) for inspection
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
# shellcheck source=scripts/docker/dockerd.sh
source scripts/docker/dockerd.sh

VENV_BIN="$ROOT/.venv/bin"
CACHE=${FL_IMAGING_DOCKER_CACHE:-/var/tmp/fl-imaging-docker}
PORT=${FL_IMAGING_DOCKER_PORT:-47090}
ROUNDS=${FL_IMAGING_DOCKER_ROUNDS:-2}
BASE_TAR="$CACHE/base-bookworm.tar"
BASE_IMAGE=fl-imaging-base:bookworm
TAG="test"
IMAGE=fl-imaging-site:$TAG
PROJECT=fl-imaging-test
SITES=(hospital_a hospital_b hospital_c)
TORCH_WHEEL_GLOB='torch-2.13.0+cpu-cp311-*.whl'

log() { echo "[test-docker $(date +%H:%M:%S)] $*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

# --- preconditions -------------------------------------------------------------------------
dockerd_check || exit 1
[ -x "$VENV_BIN/flwr" ] || die "no $VENV_BIN/flwr: run 'make setup' first"
if command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
elif "$DOCKER" compose version >/dev/null 2>&1; then
    COMPOSE=("$DOCKER" compose)
else
    die "no docker-compose and no 'docker compose': apt-get install docker-compose"
fi
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "FL_IMAGING_DOCKER_ROUNDS=$ROUNDS: a whole number >= 1"

find_torch_wheel() {
    if [ -n "${FL_IMAGING_TORCH_WHEEL:-}" ]; then
        echo "$FL_IMAGING_TORCH_WHEEL"
        return
    fi
    # pip's find-links and file:// index folders, as `pip config list` names them
    local dirs
    dirs=$("$VENV_BIN/python" -m pip config list 2>/dev/null |
        sed -n "s/^[^=]*\(find-links\|index-url\)='\(.*\)'$/\2/p" | tr ' ' '\n' |
        sed -n 's#^file://##p; /^\//p' | sort -u)
    # shellcheck disable=SC2086
    [ -n "$dirs" ] && find $dirs -maxdepth 3 -name "$TORCH_WHEEL_GLOB" 2>/dev/null | head -n 1
}
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "port $PORT is in use: set FL_IMAGING_DOCKER_PORT to a free one"
fi
TORCH_WHEEL=$(find_torch_wheel || true)
[ -n "$TORCH_WHEEL" ] && [ -f "$TORCH_WHEEL" ] ||
    die "no $TORCH_WHEEL_GLOB in pip's find-links folders; set FL_IMAGING_TORCH_WHEEL"

# --- clean-up, whatever happens --------------------------------------------------------------
WORK=$(mktemp -d /tmp/fl-docker.XXXXXX)
WHEEL_LINK="$ROOT/scripts/docker/wheels/$(basename "$TORCH_WHEEL")"
export FL_IMAGING_CERTS="$WORK/certs" FL_IMAGING_DATA="$ROOT/data/synthetic"
export FL_IMAGING_PORT="$PORT" FL_IMAGING_TAG="$TAG"
compose() { "${COMPOSE[@]}" --project-name "$PROJECT" --file "$ROOT/compose.yaml" "$@"; }
# the container ID of a compose service
cid() { compose ps -q "$1"; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -S "$WORK/docker/docker.sock" ]; then
        if [ "$rc" != 0 ]; then
            for c in $("$DOCKER" ps -a --format '{{.Names}}' 2>/dev/null); do
                log "last log lines of container $c:"
                "$DOCKER" logs --tail 25 "$c" 2>&1 | sed "s/^/  $c| /" >&2 || true
            done
        fi
        compose down -v --remove-orphans >/dev/null 2>&1 || true
        local ids
        ids=$("$DOCKER" ps -aq 2>/dev/null || true)
        # shellcheck disable=SC2086
        [ -z "$ids" ] || "$DOCKER" rm -f $ids >/dev/null 2>&1 || true
    fi
    log "stopping the private dockerd, removing its data"
    if dockerd_stop "$WORK/docker"; then
        log "cleaned up"
    else
        log "FAILED: the private dockerd did not stop"
        rc=1
    fi
    rm -f "$WHEEL_LINK"
    if [ "${FL_IMAGING_DOCKER_KEEP:-0}" = 1 ]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

t0=$(date +%s)

# --- data, base image, daemon ----------------------------------------------------------------
if [ ! -f data/synthetic/hospital_c/dataset.json ]; then
    log "writing the synthetic hospitals (fl-imaging synth --out data/synthetic)"
    "$VENV_BIN/fl-imaging" synth --out data/synthetic
fi
if [ ! -s "$BASE_TAR" ]; then
    command -v mmdebstrap >/dev/null || die "no mmdebstrap: apt-get install mmdebstrap"
    log "making the base image tarball $BASE_TAR (mmdebstrap bookworm)"
    mkdir -p "$CACHE"
    mmdebstrap --quiet --format=tar --variant=apt --include=python3,python3-venv,ca-certificates,passwd \
        bookworm "$BASE_TAR.part"
    mv "$BASE_TAR.part" "$BASE_TAR"
fi

log "starting a private dockerd in $WORK/docker"
dockerd_start "$WORK/docker"
"$DOCKER" import "$BASE_TAR" "$BASE_IMAGE" >/dev/null
t_ready=$(date +%s)

# --- build -----------------------------------------------------------------------------------
ln -f "$TORCH_WHEEL" "$WHEEL_LINK" 2>/dev/null || cp "$TORCH_WHEEL" "$WHEEL_LINK"
log "building $IMAGE from ./Dockerfile on $BASE_IMAGE with $(basename "$TORCH_WHEEL")"
# the build uses the host's network; the host's CA bundle lets pip reach the package index
# through a network that inspects TLS
"$DOCKER" build --progress=plain --network host --tag "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX_URL= \
    --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt \
    . >"$WORK/build.log" 2>&1 || {
    tail -n 40 "$WORK/build.log" >&2
    die "docker build"
}
rm -f "$WHEEL_LINK"
t_built=$(date +%s)
IMAGE_BYTES=$("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE")
log "image $IMAGE: $((IMAGE_BYTES / 1000000)) MB"

# --- certificates, then compose up ------------------------------------------------------------
SITE_UID=$("$DOCKER" run --rm "$IMAGE" id -u)
[ "$SITE_UID" != 0 ] || die "the image runs as root"
"$VENV_BIN/python" scripts/deploy/make_certs.py --out "$WORK/certs" --sites "${SITES[@]}" \
    --host superlink >"$WORK/make_certs.log" 2>&1 || {
    cat "$WORK/make_certs.log" >&2
    die "make_certs.py"
}
# the containers' user must read the keys (private to their owner)
chown -R "$SITE_UID" "$WORK/certs"

log "docker-compose up (SuperLink, key registration, ${SITES[*]})"
compose up -d --no-build >"$WORK/compose-up.log" 2>&1 || {
    cat "$WORK/compose-up.log" >&2
    die "compose up"
}
[ "$("$DOCKER" inspect --format '{{.State.ExitCode}}' "$(cid register)")" = 0 ] ||
    die "the key registration failed"
t_up=$(date +%s)

export FLWR_HOME="$WORK/flwr-home" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$FLWR_HOME"
printf '[superlink]\ndefault = "compose"\n\n[superlink.compose]\naddress = "127.0.0.1:%s"\nroot-certificates = "%s"\n' \
    "$PORT" "$WORK/certs/ca.crt" >"$FLWR_HOME/config.toml"

# Every site's manifest is /data/dataset.json inside its own container (node config), so the
# federation config names the sites only; hospital_a trains with DP-SGD.
sites="{name:hospital_a,manifest:/data/dataset.json,privacy:{epsilon:8.0}}"
sites+=",{name:hospital_b,manifest:/data/dataset.json}"
sites+=",{name:hospital_c,manifest:/data/dataset.json}"
overrides="federation.sites=[$sites] model=unet_tiny data.patch_size=[16,16,16]"
overrides+=" train.local_epochs=1 strategy.cross_site_epochs=0 strategy.connect_timeout=180"
flwr_run() { # LOG OVERRIDES...
    local out=$1
    shift
    PATH="$VENV_BIN:$PATH" timeout 900 flwr run . compose --stream \
        --run-config "experiment='demo' overrides='$overrides $*'" >"$out" 2>&1 || {
        tail -n 40 "$out" >&2
        return 1
    }
}

# --- 1. a federation of $ROUNDS rounds ---------------------------------------------------------
log "flwr run . compose ($ROUNDS rounds, ${#SITES[@]} hospital containers)"
t_run=$(date +%s)
flwr_run "$WORK/flwr-run.log" "rounds=$ROUNDS" || die "flwr run"
t_done=$(date +%s)

# --- 2. the coordinator restarts; the hospitals come back by themselves -------------------------
log "restarting the SuperLink container"
"$DOCKER" restart "$(cid superlink)" >/dev/null
t_restarted=$(date +%s)
log "flwr run . compose (resume=latest rounds=$((ROUNDS + 1)))"
flwr_run "$WORK/flwr-resume.log" "resume=latest rounds=$((ROUNDS + 1))" ||
    die "flwr run after the SuperLink restart"
t_resumed=$(date +%s)

# --- checks: run folder, ledger, /data, users -----------------------------------------------------
"$DOCKER" cp "$(cid superlink):/state/outputs" "$WORK/outputs"
"$DOCKER" cp "$(cid hospital_a):/state" "$WORK/hospital_a-state"
RUN_DIR=$(find "$WORK/outputs" -mindepth 1 -maxdepth 1 -type d | head -n 1)
[ -n "$RUN_DIR" ] || die "the ServerApp wrote no run folder under the SuperLink's /state/outputs"
owner=$("$DOCKER" exec "$(cid hospital_a)" stat -c %u /state/privacy_ledger.json) ||
    die "no privacy ledger in hospital_a's /state"
[ "$owner" = "$SITE_UID" ] || die "hospital_a's ledger is owned by uid $owner, not $SITE_UID"
CHECKS=$(OVERRIDES="$overrides" "$VENV_BIN/python" - "$RUN_DIR" "$WORK/hospital_a-state" "$ROUNDS" \
    "${SITES[@]}" <<'EOF'
import json
import os
import sys
from pathlib import Path

from fl_imaging.privacy.ledger import read_ledger

run_dir, state, first = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
sites, rounds = sorted(sys.argv[4:]), first + 1
summary = json.loads((run_dir / "summary.json").read_text())
problems = []
expect = {"status": "finished", "rounds_completed": rounds, "resumed_after_rounds": [first]}
for key, value in expect.items():
    if summary.get(key) != value:
        problems.append(f"summary {key} {summary.get(key)!r}, expected {value!r}")
if sorted(summary.get("final_dice_per_site", {})) != sites:
    problems.append(f"final_dice_per_site {summary.get('final_dice_per_site')}, expected {sites}")
rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
trained = [(r["round"], r["site"]) for r in rows if r.get("split") == "train"]
wanted = [(n, s) for n in range(1, rounds + 1) for s in sites]
if sorted(trained) != wanted:
    problems.append(f"training rows (round, site) {sorted(trained)}, expected each of {wanted} once")
# hospital_a's noise was planned to spend its budget over the first run's rounds: it trains
# (and its ledger charges) rounds 1..first; in the resumed round its budget is exhausted
ledger = read_ledger(state)
charged = [] if ledger is None else [int(e["round"]) for e in ledger.rounds]
mine = {r["round"]: r for r in rows if r.get("split") == "train" and r["site"] == "hospital_a"}
# a round it executed: no status (budget exhausted, refused) and no error; 0 steps still count
ran = sorted(n for n, r in mine.items() if not r.get("status") and not r.get("error"))
if charged != ran or ran != list(range(1, first + 1)):
    problems.append(f"hospital_a trained rounds {ran}, its ledger charged {charged}; expected 1..{first}")
if mine.get(rounds, {}).get("status") != "budget_exhausted":
    problems.append(f"hospital_a's round {rounds} row {mine.get(rounds)}: expected budget_exhausted")
epsilon = summary.get("epsilon_spent_per_site", {}).get("hospital_a")
if ledger is None or epsilon is None or abs(ledger.epsilon_spent - epsilon) > 1e-6:
    problems.append(f"hospital_a: summary epsilon {epsilon}, ledger {ledger and ledger.epsilon_spent}")
elif not 0 < epsilon <= 8:
    problems.append(f"hospital_a (private, epsilon 8) spent epsilon {epsilon}")
for problem in problems:
    print(f"{run_dir}: {problem}", file=sys.stderr)
if problems:
    sys.exit(1)
# a round's wall: its train phase (send, site compute, reply) plus aggregation
phases = summary["round_seconds"]
walls = {n: round(p["train"] + p["aggregate"], 2) for n, p in phases.items()}
final = round(phases[str(rounds)]["evaluate"], 2)
report = {"round_walls": walls, "final_evaluate_s": final, "epsilon_hospital_a": round(epsilon, 3)}
print(json.dumps({**report, "overrides": os.environ["OVERRIDES"]}))
EOF
) || die "run folder check"
log "run folder OK: $(basename "$RUN_DIR") (finished, $((ROUNDS + 1)) rounds with a restart, ${SITES[*]})"
log "hospital_a's ledger (uid $SITE_UID, in its /state) charges every round it trained; round $((ROUNDS + 1)): budget exhausted"
for service in superlink "${SITES[@]}"; do
    id=$(cid "$service")
    [ "$("$DOCKER" exec "$id" id -u)" != 0 ] || die "$service runs as root"
    [ "$service" = superlink ] && continue
    if "$DOCKER" exec "$id" touch /data/write-test 2>/dev/null; then
        die "$service can write to its data (/data)"
    fi
done
log "no container runs as root; every hospital's /data is read-only"

# --- 4. down leaves nothing behind -----------------------------------------------------------------
compose down -v >"$WORK/compose-down.log" 2>&1 || {
    cat "$WORK/compose-down.log" >&2
    die "compose down"
}
left=$("$DOCKER" ps -aq)
left+=$("$DOCKER" volume ls -q)
left+=$("$DOCKER" network ls -q --filter "label=com.docker.compose.project=$PROJECT")
[ -z "$left" ] || die "compose down -v left: $left"
log "compose down -v: no container, volume or network left"

t_end=$(date +%s)
printf '{"image": "%s", "image_bytes": %s, "daemon_and_base_s": %s, "build_s": %s, "up_s": %s, ' \
    "$IMAGE" "$IMAGE_BYTES" $((t_ready - t0)) $((t_built - t_ready)) $((t_up - t_built))
printf '"first_run_s": %s, "coordinator_restart_s": %s, "resumed_run_s": %s, "total_s": %s, ' \
    $((t_done - t_run)) $((t_restarted - t_done)) $((t_resumed - t_restarted)) $((t_end - t0))
printf '"isolation": "%s", "sites": %s, "checks": %s}\n' \
    "${FL_IMAGING_ISOLATION:-warm}" "${#SITES[@]}" "$CHECKS"
