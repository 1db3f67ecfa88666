"""Flower ServerApp: names the sites while it imports the rest, then runs the federation.

The module itself imports neither torch nor MONAI. Flower's simulation loads the
ServerApp and then the ClientApp under one lock before it starts Ray, so a heavy
module here would hold Ray back for as long as torch and MONAI take to import
(about 3.5 s). Instead, when the run starts, :mod:`fl_imaging.server` (torch, MONAI)
is imported in a background thread while the main thread asks every connected site
its name: the sites load their own code for that first message at the same time.
"""

from __future__ import annotations

import importlib
import threading

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_imaging.config import compose
from fl_imaging.logs import setup_logging
from fl_imaging.protocol import RunConfigKey
from fl_imaging.server.grid import PromptGrid, identify_sites

SERVER_MODULE = "fl_imaging.server.rounds"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config (``experiment``, ``overrides``)."""
    setup_logging()
    importer = threading.Thread(
        target=importlib.import_module, args=(SERVER_MODULE,), name="import-server", daemon=True
    )
    importer.start()
    plan = compose(
        str(context.run_config.get(RunConfigKey.EXPERIMENT, "")),
        str(context.run_config.get(RunConfigKey.OVERRIDES, "")),
    )
    node_sites = identify_sites(PromptGrid(grid), plan.strategy.round_timeout)
    importer.join()
    server = importlib.import_module(SERVER_MODULE)  # raises here if the import failed
    server.serve(grid, context, node_sites)
