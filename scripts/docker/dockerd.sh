# shellcheck shell=bash
# A private Docker daemon for tests, sourced by scripts/docker/test_docker.sh.
#
# It needs root and the docker.io package (dockerd, containerd, runc and the `docker`
# client with BuildKit). It uses its own data root, exec root and socket, so it touches no
# other daemon, and runs without iptables (it changes no firewall rule of the machine). Its
# default bridge stays: compose networks need it (containers reach each other by service
# name; published ports go through docker-proxy).
#
#   source scripts/docker/dockerd.sh
#   dockerd_start DIR      # daemon state under DIR; sets DOCKER_HOST and DOCKER
#   "$DOCKER" ps
#   dockerd_stop DIR       # stop the daemon, unmount what it left, delete DIR
# Remove the containers first (docker rm -f): their processes go with them.

# The client from the docker.io package: another `docker` first on PATH may lack BuildKit.
DOCKER=${DOCKER:-/usr/bin/docker}
DOCKERD=${DOCKERD:-/usr/sbin/dockerd}

dockerd_check() {
    if [ "$(id -u)" != 0 ]; then
        echo "the private Docker daemon needs root" >&2
        return 1
    fi
    if [ ! -x "$DOCKERD" ] || [ ! -x "$DOCKER" ]; then
        echo "no $DOCKERD or $DOCKER: apt-get install docker.io (or set DOCKERD/DOCKER)" >&2
        return 1
    fi
}

dockerd_start() {
    local dir=$1
    dockerd_check || return 1
    mkdir -p "$dir/data" "$dir/exec"
    # A short exec root: containerd's socket paths must stay under 108 characters. Its own
    # session: a Ctrl-C of the caller must not kill it before the containers are removed.
    setsid "$DOCKERD" --storage-driver=overlay2 --iptables=false --ip6tables=false \
        --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
        -H "unix://$dir/docker.sock" >"$dir/dockerd.log" 2>&1 &
    echo $! >"$dir/dockerd.launcher.pid"
    export DOCKER_HOST="unix://$dir/docker.sock" DOCKER_BUILDKIT=1
    for _ in $(seq 60); do
        if "$DOCKER" version >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$(cat "$dir/dockerd.launcher.pid")" 2>/dev/null; then
            break
        fi
        sleep 1
    done
    echo "dockerd did not start; its log:" >&2
    tail -n 30 "$dir/dockerd.log" >&2
    return 1
}

dockerd_stop() {
    local dir=$1 pid mnt
    [ -d "$dir" ] || return 0
    # the PID dockerd wrote itself (setsid may have forked), else the one it was started as
    pid=$(cat "$dir/dockerd.pid" 2>/dev/null || cat "$dir/dockerd.launcher.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid"
            sleep 1
        fi
    fi
    # Unmount what the daemon left (overlay layers, netns, shm), deepest first, then delete.
    awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r |
        while read -r mnt; do
            umount -l "$mnt" 2>/dev/null || echo "could not unmount $mnt" >&2
        done
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        echo "dockerd (PID $pid) did not stop; leaving $dir in place" >&2
        return 1
    fi
    rm -rf "$dir"
}
