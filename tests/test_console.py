"""What `fl-imaging run` shows of Flower's stream: the run, not the noise; never privacy."""

from __future__ import annotations

import pytest

from fl_imaging.tools.console import ConsoleFilter

SHOWN = [
    "04:27:04 INFO round 1/8 done | 3/3 sites evaluated | mean Dice 0.038 | 6 s elapsed\n",
    "04:27:04 INFO round 0 Dice: mean 0.038 | hospital_a 0.050 (oedema 0.084, core 0.016)\n",
    "04:27:03 INFO [hospital_a r1] trained 7 cases, 8 steps, loss 1.7204, 0.4 s\n",
    "Successfully started run 11447921814507130526\n",
    "04:27:19 INFO finished 8 rounds in 0.3 min: final mean Dice 0.827\n",
    "\x1b[93mWARNING \x1b[0m:   aggregate_train: Received 2 results and 1 failures\n",
    # privacy and library warnings that matter are never hidden, even in a noisy form
    "/x/site-packages/opacus/privacy_engine.py:96: UserWarning: Secure RNG turned off.\n",
    "/x/site-packages/monai/utils/deprecate_utils.py:220: FutureWarning: epsilon argument\n",
    "04:27:03 INFO [hospital_a r1] epoch 1/2 loss 1.8889 (DP-SGD, epsilon 0.4)\n",
    "04:27:05 WARNING REFUSED node 7: its key ... belongs to no site in federation.site_keys\n",
]
HIDDEN = [
    "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `11447921814507130526`\n",
    "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n",
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed\n",
    "\x1b[92mINFO \x1b[0m:      Federation `@none/default` (3 simulated SuperNodes)\n",
    "\x1b[92mINFO \x1b[0m:      To change federation size, use the following command:\n",
    "\x1b[92mINFO \x1b[0m:      \tflwr federation simulation-config @none/default <superlink>\n",
    "Successfully installed fl-imaging to /work/main/.flwr/apps/fl-imaging.0.1.0.5c43fcd6.\n",
    "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 3 nodes (out of 3)\n",
    "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 3 results and 0 failures\n",
    "\x1b[36m(ClientAppActor pid=12204)\x1b[0m 04:27:02 INFO [hospital_a r1] epoch 1/2 loss 1.9\n",
    "/x/site-packages/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions\n",
    "  warnings.warn(\n",
    "/x/site-packages/torchvision/io/image.py:33: DeprecationWarning: The image decoding\n",
    "\x1b[92mINFO \x1b[0m:      \n",
]


@pytest.mark.parametrize("line", SHOWN)
def test_the_lines_a_run_is_read_by_are_shown(line: str) -> None:
    assert ConsoleFilter().show(line) == line


@pytest.mark.parametrize("line", HIDDEN)
def test_known_noise_is_left_to_the_console_log(line: str) -> None:
    console = ConsoleFilter()
    assert console.show(line) is None
    assert console.hidden == 1


def test_rays_actor_prefix_is_dropped_from_a_sites_line() -> None:
    line = (
        "\x1b[36m(ClientAppActor pid=12204)\x1b[0m 04:27:03 INFO [hospital_a r1] trained 7 cases\n"
    )
    assert ConsoleFilter().show(line) == "04:27:03 INFO [hospital_a r1] trained 7 cases\n"


def test_verbose_shows_every_line_as_it_came() -> None:
    console = ConsoleFilter(verbose=True)
    assert [console.show(line) for line in HIDDEN] == HIDDEN
    assert console.hidden == 0


def test_a_line_flower_prints_twice_is_shown_once() -> None:
    console = ConsoleFilter()
    coloured = "\x1b[93mWARNING \x1b[0m:   Node 7 is unavailable\n"
    stamped = "12/02/2026 04:29:34:WARNING:Node 7 is unavailable\n"
    assert console.show(coloured) == coloured
    assert console.show(stamped) is None
    assert console.show("12/02/2026 04:29:34:DEBUG:ServerApp finished running.\n") is None


def test_error_words_keep_a_line_only_as_written() -> None:
    # Ray's tip says "turn off this error message": noise, not an error
    tip = (
        "/x/site-packages/ray/_private/worker.py:2051: FutureWarning: Tip: ... "
        "To enable this behavior and turn off this error message, set RAY_X=0\n"
    )
    assert ConsoleFilter().show(tip) is None
    assert ConsoleFilter().show("04:29:34 ERROR site hospital_b FAILED: round 2\n") is not None
