# fl-imaging site image: one hospital's Flower SuperNode with this app's dependencies.
#
#   docker build -t fl-imaging-site .
#   docker run -d --name site-a \
#       -v /srv/scans/site_a:/data:ro -v site_a_state:/state \
#       -v /srv/fl/ca.crt:/certs/ca.crt:ro -v /srv/fl/site_a.key:/certs/supernode.key:ro \
#       -e FL_IMAGING_SITE=hospital_a -e FL_IMAGING_SUPERLINK=superlink.example.org:9092 \
#       fl-imaging-site
#
# The code a run executes arrives with the run (`flwr run .` sends the app bundle). The
# image holds the hospital's own copy of fl_imaging only for the warm ClientApp executor
# (scripts/deploy/warm_executor.py: it imports torch and MONAI once and forks one process
# per message, which loads the app from the run's bundle) and its bundle-approval check.
# /data holds the site's manifest (dataset.json) and scans, read-only; /state gets the
# privacy ledger and other site state. The same image runs the SuperLink (and with it
# the ServerApp): `docker run ... fl-imaging-site flower-superlink ...`; compose.yaml shows
# both. Offline builds (scripts/docker/test_docker.sh) pass a locally made BASE_IMAGE,
# an empty TORCH_INDEX_URL and the torch wheel in scripts/docker/wheels/.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}

# Where pip finds the pinned CPU torch (torch==2.13.0+cpu); "" when its wheel is in
# scripts/docker/wheels/.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SITE_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

SHELL ["/bin/sh", "-eu", "-c"]

# A CA bundle passed as the build secret "pip-ca" is used for the package index (for
# networks that inspect TLS); without it pip uses its own.
RUN --mount=type=bind,source=scripts/docker/requirements.txt,target=/tmp/requirements.txt \
    --mount=type=bind,source=scripts/docker/wheels,target=/tmp/wheels \
    --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    python3 -m venv "$VIRTUAL_ENV"; \
    pip install --no-cache-dir --find-links /tmp/wheels \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        --requirement /tmp/requirements.txt; \
    python -c "import flwr, hydra, monai, nibabel, opacus, torch; print('torch', torch.__version__)"

RUN groupadd --gid "${SITE_UID}" site; \
    useradd --no-log-init --create-home --uid "${SITE_UID}" --gid site \
        --shell /usr/sbin/nologin site; \
    mkdir -p /data /state /certs; \
    chown site:site /state

# The hospital's copy of the package (no dependencies: they are pinned above), then the
# executor and the entrypoint; these layers change with the code, the ones above do not.
RUN --mount=type=bind,source=.,target=/tmp/src,rw \
    --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    pip install --no-cache-dir --no-deps /tmp/src; \
    python -c "import fl_imaging.tools.bundle"
COPY scripts/deploy/warm_executor.py /usr/local/lib/fl-imaging/warm_executor.py
COPY scripts/docker/entrypoint.sh /usr/local/bin/fl-imaging-site

USER ${SITE_UID}:${SITE_UID}
WORKDIR /home/site
VOLUME ["/state"]
ENTRYPOINT ["/usr/local/bin/fl-imaging-site"]
