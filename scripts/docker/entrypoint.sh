#!/bin/bash
# Entrypoint of the fl-imaging site image: start this hospital's Flower SuperNode.
#
#   docker run ... fl-imaging-site [--site NAME] [--superlink HOST:PORT] [--insecure] [--port N]
#   docker run ... fl-imaging-site flower-superlink ...     (any other command runs as given)
#
# Settings (arguments win over environment):
#   FL_IMAGING_SITE       --site       this hospital's name in the federation config (required)
#   FL_IMAGING_SUPERLINK  --superlink  the SuperLink's address, HOST:PORT (required)
#   FL_IMAGING_INSECURE=1 --insecure   plain HTTP, no node authentication: local tests only
#   FL_IMAGING_ROOT_CERT               CA certificate of the SuperLink (default /certs/ca.crt)
#   FL_IMAGING_AUTH_KEY                the hospital's SuperNode key (default /certs/supernode.key)
#   FL_IMAGING_MANIFEST                the site's manifest (default /data/dataset.json)
#   FL_IMAGING_CLIENTAPP_PORT --port   the SuperNode's local ClientApp API port (default 9094;
#                                      give each container its own with --network host)
#   FL_IMAGING_ISOLATION  warm (default): the SuperNode runs with --isolation process and the
#                         warm executor next to it forks each message's ClientApp from a
#                         process that has torch and MONAI imported already; subprocess:
#                         Flower's own executor (a fresh process per message, which imports
#                         torch and MONAI each time)
#   FL_IMAGING_APPROVED_BUNDLES  the hospital's approved app-bundle hashes (a mounted file,
#                         `fl-imaging site approve`); warm only: any other bundle is refused
#                         before anything of it is installed
# The container stops when the SuperNode or its executor stops (the other is stopped too),
# with the exit status of the one that stopped first.
# The data is read from /data (mounted read-only); the privacy ledger and other site state
# go to /state (a writable volume).
set -eu

case "${1:-}" in
    "" | -*) ;;
    *) exec "$@" ;;
esac

site="${FL_IMAGING_SITE:-}"
superlink="${FL_IMAGING_SUPERLINK:-}"
insecure="${FL_IMAGING_INSECURE:-0}"
port="${FL_IMAGING_CLIENTAPP_PORT:-9094}"
root_cert="${FL_IMAGING_ROOT_CERT:-/certs/ca.crt}"
auth_key="${FL_IMAGING_AUTH_KEY:-/certs/supernode.key}"
manifest="${FL_IMAGING_MANIFEST:-/data/dataset.json}"
isolation="${FL_IMAGING_ISOLATION:-warm}"
approved="${FL_IMAGING_APPROVED_BUNDLES:-}"
executor=/usr/local/lib/fl-imaging/warm_executor.py

usage() {
    echo "usage: [--site NAME] [--superlink HOST:PORT] [--insecure] [--port N]" >&2
    echo "       (or FL_IMAGING_SITE, FL_IMAGING_SUPERLINK, ...; see the image's entrypoint)" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --site) [ $# -ge 2 ] || usage; site="$2"; shift 2 ;;
        --superlink) [ $# -ge 2 ] || usage; superlink="$2"; shift 2 ;;
        --port) [ $# -ge 2 ] || usage; port="$2"; shift 2 ;;
        --insecure) insecure=1; shift ;;
        -h | --help) usage ;;
        *) echo "fl-imaging-site: unknown argument $1" >&2; usage ;;
    esac
done

fail() {
    echo "fl-imaging-site: $*" >&2
    exit 2
}

[ -n "$site" ] || fail "no site name: set FL_IMAGING_SITE or pass --site NAME"
[ -n "$superlink" ] || fail "no SuperLink address: set FL_IMAGING_SUPERLINK or pass --superlink HOST:PORT"
case "$site" in
    *[!A-Za-z0-9._-]*) fail "site name '$site' may only contain letters, digits, '.', '_', '-'" ;;
esac
[ -r "$manifest" ] || fail "site $site: no readable manifest at $manifest (mount the site's data folder read-only at /data, or set FL_IMAGING_MANIFEST)"
case "$isolation" in
    warm | subprocess) ;;
    *) fail "FL_IMAGING_ISOLATION='$isolation': use warm or subprocess" ;;
esac
if [ -n "$approved" ]; then
    [ "$isolation" = warm ] || fail "FL_IMAGING_APPROVED_BUNDLES needs FL_IMAGING_ISOLATION=warm"
    [ -r "$approved" ] || fail "site $site: no readable list of approved bundles at $approved"
fi
[ -w /state ] || fail "site $site: /state is not writable by uid $(id -u) (mount a writable volume there)"

if [ "$insecure" = 1 ]; then
    set -- --insecure
else
    [ -r "$root_cert" ] || fail "site $site: no CA certificate at $root_cert (mount it, set FL_IMAGING_ROOT_CERT, or --insecure for a local test)"
    [ -r "$auth_key" ] || fail "site $site: no SuperNode key at $auth_key (mount it, set FL_IMAGING_AUTH_KEY, or --insecure for a local test)"
    set -- --root-certificates "$root_cert" --auth-supernode-private-key "$auth_key"
fi

echo "fl-imaging-site: site $site, SuperLink $superlink, data $manifest, state /state, $isolation ClientApps" >&2
node_args=(
    "$@"
    --superlink "$superlink"
    --port "$port"
    --node-config "site='$site' manifest='$manifest' data-root='/data' state-dir='/state'"
)
if [ "$isolation" = subprocess ]; then
    exec flower-supernode "${node_args[@]}"
fi

# warm: the SuperNode and the executor side by side; a signal to the container stops both
node="" warm=""
stop() {
    # shellcheck disable=SC2086
    kill -TERM $node $warm 2>/dev/null || true
}
trap 'stop; wait; exit 143' TERM
trap 'stop; wait; exit 130' INT
flower-supernode --isolation process "${node_args[@]}" &
node=$!
# the executor polls the SuperNode's ClientApp API: wait until it listens (or the node stops)
for _ in $(seq 120); do
    kill -0 "$node" 2>/dev/null || break
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.5
done
if kill -0 "$node" 2>/dev/null; then
    python "$executor" --runtime-api-address "127.0.0.1:$port" --parent-pid "$node" \
        ${approved:+--approved-bundles "$approved"} &
    warm=$!
fi
rc=0
wait -n || rc=$?
echo "fl-imaging-site: the $( kill -0 "$node" 2>/dev/null && echo executor || echo SuperNode) stopped (status $rc); stopping the container" >&2
stop
wait
exit "$rc"
