#!/usr/bin/env bash
# make test-docker: the site image, built from the real Dockerfile, runs a federation.
#
# Starts a private Docker daemon (scripts/docker/dockerd.sh), makes a Debian bookworm base
# image locally (mmdebstrap + docker import; no registry needed), builds the Dockerfile on it
# with the CPU torch wheel found on this machine, starts a SuperLink and two hospital
# containers (synthetic hospitals a and b, data read-only, state on a writable folder), runs
# `flwr run . <federation>` for 2 tiny rounds against that SuperLink and checks the run
# folder (summary.json: status finished, 2 rounds, both sites; hospital_a trains with DP-SGD
# and its privacy ledger must be in its /state). Everything it started
# (containers, daemon, mounts, temporary files) is removed on exit, also on failure.
# Prints one JSON line with the timings and the image size.
#
# Needs root, the docker.io and mmdebstrap packages, network access to the Debian mirror and
# the Python package index, and the project's .venv (make setup).
#   FL_IMAGING_TORCH_WHEEL   the torch==2.13.0+cpu wheel (default: searched in pip's find-links)
#   FL_IMAGING_DOCKER_CACHE  where the base image tarball is kept (default /var/tmp/fl-imaging-docker)
#   FL_IMAGING_DOCKER_PORT   the SuperLink's port; the hospitals use the next two (default 47090)
#   FL_IMAGING_DOCKER_INSECURE=1  no TLS and no SuperNode authentication (default: both, with
#                            the CA, SuperLink certificate and hospital keys of
#                            scripts/deploy/make_certs.py; the hospitals' keys are registered
#                            with `flwr supernode register` before they start)
#   FL_IMAGING_DOCKER_KEEP=1 keep the work folder (logs, run folder) for inspection
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
# shellcheck source=scripts/docker/dockerd.sh
source scripts/docker/dockerd.sh

VENV_BIN="$ROOT/.venv/bin"
CACHE=${FL_IMAGING_DOCKER_CACHE:-/var/tmp/fl-imaging-docker}
PORT=${FL_IMAGING_DOCKER_PORT:-47090}
BASE_TAR="$CACHE/base-bookworm.tar"
BASE_IMAGE=fl-imaging-base:bookworm
IMAGE=fl-imaging-site:test
SITES=(hospital_a hospital_b)
INSECURE=${FL_IMAGING_DOCKER_INSECURE:-0}
TORCH_WHEEL_GLOB='torch-2.13.0+cpu-cp311-*.whl'

log() { echo "[test-docker $(date +%H:%M:%S)] $*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# --- preconditions -------------------------------------------------------------------------
dockerd_check || exit 1
[ -x "$VENV_BIN/flwr" ] || die "no $VENV_BIN/flwr: run 'make setup' first"

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
for p in "$PORT" $((PORT + 1)) $((PORT + 2)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        die "port $p is in use: set FL_IMAGING_DOCKER_PORT to a free range"
    fi
done
TORCH_WHEEL=$(find_torch_wheel || true)
[ -n "$TORCH_WHEEL" ] && [ -f "$TORCH_WHEEL" ] ||
    die "no $TORCH_WHEEL_GLOB in pip's find-links folders; set FL_IMAGING_TORCH_WHEEL"

# --- clean-up, whatever happens --------------------------------------------------------------
WORK=$(mktemp -d /tmp/fl-docker.XXXXXX)
WHEEL_LINK="$ROOT/scripts/docker/wheels/$(basename "$TORCH_WHEEL")"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -S "$WORK/docker/docker.sock" ]; then
        local ids
        ids=$("$DOCKER" ps -aq 2>/dev/null || true)
        if [ "$rc" != 0 ] && [ -n "$ids" ]; then
            for c in $("$DOCKER" ps -a --format '{{.Names}}'); do
                log "last log lines of container $c:"
                "$DOCKER" logs --tail 25 "$c" 2>&1 | sed "s/^/  $c| /" >&2 || true
            done
        fi
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
if [ ! -f data/synthetic/hospital_a/dataset.json ]; then
    log "writing the synthetic hospitals (fl-imaging synth --out data/synthetic)"
    "$VENV_BIN/fl-imaging" synth --out data/synthetic
fi
if [ ! -s "$BASE_TAR" ]; then
    command -v mmdebstrap >/dev/null || die "no mmdebstrap: apt-get install mmdebstrap"
    log "making the base image tarball $BASE_TAR (mmdebstrap bookworm)"
    mkdir -p "$CACHE"
    mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates,passwd \
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
# no bridge network: the build uses the host's; the host's CA bundle lets pip reach the package index through this network's TLS proxy
"$DOCKER" build --progress=plain --network host --tag "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX_URL= \
    --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt \
    . >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; die "docker build"; }
rm -f "$WHEEL_LINK"
t_built=$(date +%s)
IMAGE_BYTES=$("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE")
log "image $IMAGE: $((IMAGE_BYTES / 1000000)) MB"

# --- federation: SuperLink + hospitals ------------------------------------------------------
SITE_UID=$("$DOCKER" run --rm "$IMAGE" id -u)
[ "$SITE_UID" != 0 ] || die "the image runs as root"
# A folder the containers' non-root user owns, mounted at /state or (read-only) at /certs.
owned_dir() {
    mkdir -p "$1"
    chown "$SITE_UID" "$1"
}
# copy FILE DEST: the containers' user must read keys that are private to root here
give_copy() {
    install -m 0400 -o "$SITE_UID" "$1" "$2"
}

export FLWR_HOME="$WORK/flwr-home" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$FLWR_HOME"
{
    echo "[superlink]"
    echo 'default = "docker"'
    echo
    echo "[superlink.docker]"
    echo "address = \"127.0.0.1:$PORT\""
    if [ "$INSECURE" = 1 ]; then
        echo "insecure = true"
    else
        echo "root-certificates = \"$WORK/certs/ca.crt\""
    fi
} >"$FLWR_HOME/config.toml"

superlink_args=(--insecure)
superlink_mounts=()
if [ "$INSECURE" != 1 ]; then
    log "TLS and SuperNode authentication: scripts/deploy/make_certs.py"
    "$VENV_BIN/python" scripts/deploy/make_certs.py --out "$WORK/certs" --sites "${SITES[@]}" \
        >"$WORK/make_certs.log" 2>&1 || { cat "$WORK/make_certs.log" >&2; die "make_certs.py"; }
    owned_dir "$WORK/mounts/superlink-certs"
    for f in ca.crt superlink.crt superlink.key; do
        give_copy "$WORK/certs/$f" "$WORK/mounts/superlink-certs/$f"
    done
    superlink_args=(--ssl-ca-certfile /certs/ca.crt --ssl-certfile /certs/superlink.crt
        --ssl-keyfile /certs/superlink.key --enable-supernode-auth)
    superlink_mounts=(-v "$WORK/mounts/superlink-certs:/certs:ro")
fi

# The ServerApp runs inside the SuperLink container and writes the run folder to
# $FL_IMAGING_ROOT/outputs, i.e. $WORK/superlink/outputs here.
owned_dir "$WORK/superlink"
"$DOCKER" run -d --name superlink --network host \
    -v "$WORK/superlink:/state" -e FL_IMAGING_ROOT=/state "${superlink_mounts[@]}" \
    "$IMAGE" flower-superlink "${superlink_args[@]}" --disable-runtime-dependency-installation \
    --host 127.0.0.1 --port "$PORT" >/dev/null

if [ "$INSECURE" != 1 ]; then
    # the coordinator admits each hospital's public key (retried until the SuperLink is up)
    for site in "${SITES[@]}"; do
        for attempt in $(seq 30); do
            [ "$("$DOCKER" inspect --format '{{.State.Running}}' superlink)" = true ] ||
                die "the SuperLink container stopped"
            if timeout 20 "$VENV_BIN/flwr" supernode register \
                "$WORK/certs/supernodes/$site.pub" docker \
                --name "$site" --format json >"$WORK/register-$site.log" 2>&1 &&
                grep -q '"success": true' "$WORK/register-$site.log"; then
                break
            fi
            [ "$attempt" -lt 30 ] || { cat "$WORK/register-$site.log" >&2; die "register $site"; }
            sleep 2
        done
    done
    log "registered the keys of ${SITES[*]}"
fi

i=0
for site in "${SITES[@]}"; do
    i=$((i + 1))
    owned_dir "$WORK/state/$site"
    site_args=(--insecure)
    site_mounts=()
    if [ "$INSECURE" != 1 ]; then
        owned_dir "$WORK/mounts/$site-certs"
        give_copy "$WORK/certs/ca.crt" "$WORK/mounts/$site-certs/ca.crt"
        give_copy "$WORK/certs/supernodes/$site.key" "$WORK/mounts/$site-certs/supernode.key"
        site_args=()
        site_mounts=(-v "$WORK/mounts/$site-certs:/certs:ro")
    fi
    "$DOCKER" run -d --name "$site" --network host \
        -v "$ROOT/data/synthetic/$site:/data:ro" -v "$WORK/state/$site:/state" "${site_mounts[@]}" \
        "$IMAGE" --site "$site" --superlink "127.0.0.1:$PORT" --port $((PORT + i)) \
        "${site_args[@]}" >/dev/null
done

# --- the run ---------------------------------------------------------------------------------
# Every site's manifest is /data/dataset.json inside its own container (node config).
# hospital_a trains with DP-SGD, so its privacy ledger must appear in its /state.
sites="{name:hospital_a,manifest:/data/dataset.json,privacy:{epsilon:8.0}}"
sites+=",{name:hospital_b,manifest:/data/dataset.json}"
overrides="federation.sites=[$sites] model=unet_tiny data.patch_size=[16,16,16]"
overrides+=" rounds=2 train.local_epochs=1 strategy.cross_site_epochs=0"
overrides+=" strategy.connect_timeout=180"
log "flwr run . docker (2 rounds, ${#SITES[@]} hospital containers)"
t_run=$(date +%s)
PATH="$VENV_BIN:$PATH" timeout 900 flwr run . docker --stream \
    --run-config "experiment='demo' overrides='$overrides'" >"$WORK/flwr-run.log" 2>&1 ||
    { tail -n 40 "$WORK/flwr-run.log" >&2; die "flwr run"; }
t_done=$(date +%s)

# --- check the run folder --------------------------------------------------------------------
RUN_DIR=$(find "$WORK/superlink/outputs" -mindepth 1 -maxdepth 1 -type d | head -n 1)
[ -n "$RUN_DIR" ] || die "the ServerApp wrote no run folder under $WORK/superlink/outputs"
"$VENV_BIN/python" - "$RUN_DIR" "${SITES[@]}" <<'EOF' || die "run folder check"
import json
import sys
from pathlib import Path

run_dir, sites = Path(sys.argv[1]), sorted(sys.argv[2:])
summary = json.loads((run_dir / "summary.json").read_text())
problems = []
if summary.get("status") != "finished":
    problems.append(f"status {summary.get('status')!r}, expected 'finished'")
if summary.get("rounds_completed") != 2:
    problems.append(f"rounds_completed {summary.get('rounds_completed')!r}, expected 2")
if sorted(summary.get("final_dice_per_site", {})) != sites:
    problems.append(f"final_dice_per_site {summary.get('final_dice_per_site')}, expected {sites}")
epsilon = summary.get("epsilon_spent_per_site", {}).get("hospital_a", 0)
if not 0 < epsilon <= 8:
    problems.append(f"hospital_a (private, epsilon 8) spent epsilon {epsilon}")
rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
trained = {(r["round"], r["site"]) for r in rows if r.get("split") == "train"}
missing = [(n, s) for n in (1, 2) for s in sites if (n, s) not in trained]
if missing:
    problems.append(f"no training rows for (round, site) {missing}")
for problem in problems:
    print(f"{run_dir}: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
log "run folder OK: $(basename "$RUN_DIR") (finished, 2 rounds, ${SITES[*]})"
ledger="$WORK/state/hospital_a/privacy_ledger.json"
[ -n "$(find "$ledger" -user "$SITE_UID" 2>/dev/null)" ] ||
    die "no privacy ledger of hospital_a owned by uid $SITE_UID in its /state"
for site in "${SITES[@]}"; do
    if "$DOCKER" exec "$site" touch /data/write-test 2>/dev/null; then
        die "site $site can write to its data (/data)"
    fi
done
log "hospital_a's privacy ledger is in its /state (uid $SITE_UID); /data is read-only"

t_end=$(date +%s)
printf '{"image": "%s", "image_bytes": %s, "daemon_and_base_s": %s, "build_s": %s, ' \
    "$IMAGE" "$IMAGE_BYTES" $((t_ready - t0)) $((t_built - t_ready))
printf '"federation_run_s": %s, "total_s": %s, "sites": %s, "tls_and_auth": %s}\n' \
    $((t_done - t_run)) $((t_end - t0)) "${#SITES[@]}" "$([ "$INSECURE" = 1 ] && echo false || echo true)"
