"""A warm ClientApp executor for a SuperNode started with ``--isolation process``.

Flower's own executor (``flower-superexec``, which a SuperNode in the default
``--isolation subprocess`` starts for itself) launches a fresh ``flwr-clientapp``
process for every message; each one imports torch, MONAI and the app again, which
costs far more than a tiny model's training. This executor does what
``flower-superexec --plugin-type clientapp`` does (poll the SuperNode's Runtime API for
a ClientApp task, launch a process with the task's token) but launches by ``fork()``
from a parent that has the app's third-party dependencies imported already. The child
runs Flower's own ``flwr-clientapp`` code path (``run_clientapp``: pull the message and
the app bundle from the SuperNode, install the bundle, load the ClientApp from it, run
it, push the reply) and exits, so every message still gets a fresh process, and the app's
own modules are still loaded from the installed app bundle, not from this checkout.

With ``--approved-bundles FILE`` (the hospital's list, ``fl-imaging site approve``) a
bundle whose SHA-256 the file does not list is refused before Flower installs it: none
of the coordinator's code runs, and the reply says which hash was refused.

    python scripts/deploy/warm_executor.py --runtime-api-address 127.0.0.1:9301 \\
        --parent-pid <SuperNode PID>

Tied to Flower 1.42's Runtime API (``flwr.supercore``); pinned by ``flwr<1.43``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import ModuleType

# the hospital's own check, imported from its installation before any bundle arrives
from fl_imaging.tools.bundle import check_approved, read_approved

# what the ClientApp's handlers import (fl_imaging.apps.client_app itself imports no torch):
# a site's rounds and the SecAgg+ client (comma-separated)
WARM_MODULE = "fl_imaging.site.rounds,fl_imaging.secagg.client"
POLL_SECONDS = 0.1
# first retry and longest wait (s) when a message's objects are not at the SuperNode yet
OBJECT_POLL = 0.05
OBJECT_POLL_CAP = 0.5


def warm_up(module: str) -> list[str]:
    """Import ``module`` (comma-separated: each) and all it needs, then forget their package.

    What stays imported (torch, MONAI, nibabel, Hydra, Flower) is shared by every
    forked ClientApp; the package itself is imported again in each child from the app
    bundle Flower installs, so the code that runs is the code the run shipped.
    """
    modules = [m.strip() for m in module.split(",") if m.strip()]
    package = modules[0].split(".")[0]
    for name in modules:
        importlib.import_module(name)
    mine = [m for m in sys.modules if m == package or m.startswith(package + ".")]
    for name in mine:
        del sys.modules[name]
    return mine


def approve_before_install(runtime: ModuleType, approved: Path) -> None:
    """Make Flower's FAB installation refuse a bundle ``approved`` does not list.

    Runs in the hospital's own process before any file of the bundle is written or
    imported; Flower turns the exception into an error reply, so the server records
    why this site did not take part.
    """
    install = runtime.install_from_fab

    def install_if_approved(fab_content: bytes, *args: object, **kwargs: object) -> object:
        digest = check_approved(fab_content, approved)
        logging.info("app bundle %s... is approved (%s): installing it", digest[:16], approved)
        return install(fab_content, *args, **kwargs)

    runtime.install_from_fab = install_if_approved


def run_task(
    runtime_api_address: str,
    token: str,
    parent_pid: int | None,
    object_poll: float,
    approved: Path | None = None,
) -> None:
    """In the forked child: Flower's ``flwr-clientapp`` for one task, then exit."""
    code = 1
    try:
        from flwr.supernode.runtime import run_clientapp as runtime

        if approved is not None:
            approve_before_install(runtime, approved)

        if object_poll > 0:
            # Flower retries pulling a message's objects that the SuperNode is still fetching
            # from the SuperLink after 1 s, 2 s, 4 s...: harmless for a process that spends
            # seconds importing first, ~3 s lost per message for a warm fork that asks at once.
            runtime.pull_and_inflate_object_from_tree = functools.partial(
                runtime.pull_and_inflate_object_from_tree,
                initial_backoff=object_poll,
                backoff_cap=OBJECT_POLL_CAP,
            )
        runtime.run_clientapp(
            runtime_api_address=runtime_api_address,
            token=token,
            insecure=True,
            certificates=None,
            parent_pid=parent_pid,
            runtime_dependency_install=False,
        )
        code = 0
    except SystemExit as exc:  # flwr_exit ends the task with sys.exit(code)
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logging.getLogger("warm_executor").exception("ClientApp task failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never return into the parent's loop


def serve(
    runtime_api_address: str,
    parent_pid: int | None,
    module: str,
    object_poll: float,
    approved: Path | None = None,
) -> None:
    """Poll for ClientApp tasks and fork one warm process per task, until stopped.

    ``approved``: the hospital's list of approved bundle hashes; None: any bundle runs.
    """
    if approved is not None:
        hashes = read_approved(approved)  # a malformed list stops the executor here
        logging.info("only app bundles listed in %s run here (%d approved)", approved, len(hashes))
    started = time.monotonic()
    forgotten = warm_up(module)
    logging.info(
        "warm executor: imported %s's dependencies in %.1f s (%d modules; %d of its own "
        "re-imported per task from the app bundle)",
        module,
        time.monotonic() - started,
        len(sys.modules),
        len(forgotten),
    )
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    children: set[int] = set()
    try:
        while parent_pid is None or _alive(parent_pid):
            _reap(children)
            res = client.AcquireTask(request)
            if res.HasField("task") and res.token:
                pid = os.fork()
                if pid == 0:
                    client.close = lambda: None  # the parent's connection is not ours
                    run_task(runtime_api_address, res.token, os.getppid(), object_poll, approved)
                children.add(pid)
                logging.info("task %d: forked ClientApp process %d", res.task.task_id, pid)
            time.sleep(POLL_SECONDS)
    finally:
        client.close()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _reap(children: set[int]) -> None:
    for pid in list(children):
        with contextlib.suppress(ChildProcessError):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                if os.waitstatus_to_exitcode(status):
                    logging.warning("ClientApp process %d exited with %s", pid, status)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's host:port")
    parser.add_argument(
        "--parent-pid", type=int, help="exit when this process (the SuperNode) ends"
    )
    parser.add_argument("--warm-module", default=WARM_MODULE, help="module whose imports to keep")
    parser.add_argument(
        "--object-poll",
        type=float,
        default=OBJECT_POLL,
        help="first retry (s) for message objects not at the SuperNode yet; 0: Flower's 1 s",
    )
    parser.add_argument(
        "--approved-bundles",
        type=Path,
        help="the hospital's approved bundle hashes (`fl-imaging site approve`); a bundle "
        "not listed is refused before anything of it is installed",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(
        args.runtime_api_address,
        args.parent_pid,
        args.warm_module,
        args.object_poll,
        args.approved_bundles,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
