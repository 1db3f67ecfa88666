"""Update codecs: round-trip error bounds, shapes and dtypes, error feedback, bad input;
and bytes up/down of whole runs through the server loop (in-process grid)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message

from fl_imaging.config import ConfigError, compose, plan_to_yaml
from fl_imaging.outputs.reporting import RunFolder, traffic_line
from fl_imaging.server import rounds as server
from fl_imaging.updates.compression import (
    Codec,
    CompressionError,
    EncodedUpdate,
    decode_delta,
    decode_update,
    dequantize_int8,
    encode_update,
    quantize_int8,
    sparsify_topk,
    topk_count,
)
from fl_imaging.updates.wire import to_record
from tests.conftest import tiny_overrides
from tests.local_grid import LocalGrid, TamperingGrid, send_weights, sent_weights

CODECS = [
    Codec("none"),
    Codec("fp16"),
    Codec("int8", scales="blockwise", block_size=16),
    Codec("int8", scales="per_tensor"),
    Codec("topk", topk_fraction=0.25),
]


def model(seed: int = 0) -> dict[str, np.ndarray]:
    """A small state dict: conv weight, bias, a 0-d float, an int64 counter, an empty tensor."""
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=(4,)).astype(np.float32),
        "prelu.weight": np.array(0.25, dtype=np.float32),
        "norm.num_batches_tracked": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def trained(reference: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            out[name] = (ref + 0.01 * rng.normal(size=ref.shape)).astype(ref.dtype)
        else:
            out[name] = ref + 3
    return out


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.scales}")
def test_round_trip_keeps_names_shapes_dtypes_and_passes_counters_through(codec: Codec) -> None:
    reference = model()
    local = trained(reference)
    encoded, _ = encode_update(local, reference, codec)
    decoded = decode_update(encoded, reference)
    assert decoded.keys() == reference.keys()
    for name, ref in reference.items():
        assert decoded[name].shape == ref.shape and decoded[name].dtype == ref.dtype, name
    # a non-float tensor is the site's own value, unchanged
    assert decoded["norm.num_batches_tracked"] == 10
    assert "norm.num_batches_tracked::raw" in encoded.arrays


def test_none_is_lossless_up_to_one_float_rounding() -> None:
    reference, local = model(), trained(model())
    decoded = decode_update(encode_update(local, reference, Codec("none"))[0], reference)
    for name in reference:
        np.testing.assert_allclose(decoded[name], local[name], rtol=0, atol=1e-6)


def test_fp16_relative_error_is_at_most_half_an_fp16_ulp() -> None:
    reference, local = model(), trained(model())
    deltas = decode_delta(encode_update(local, reference, Codec("fp16"))[0], reference)
    for name, ref in reference.items():
        if name == "norm.num_batches_tracked":
            continue
        exact = local[name].astype(np.float64) - ref
        # float16: 11 significant bits (relative 2^-11), subnormals below 2^-14 (absolute 2^-25)
        bound = 2.0**-11 * np.abs(exact) + 2.0**-25
        # + the float32 rounding of local - reference itself (|weights| < 8: 2^-21)
        assert np.all(np.abs(deltas[name] - exact) <= bound + 2.0**-21), name


@pytest.mark.parametrize("block_size", [None, 1, 7, 256])
def test_int8_error_is_at_most_half_a_scale_per_element(block_size: int | None) -> None:
    values = np.random.default_rng(3).normal(size=1000).astype(np.float32) * 0.1
    codes, scales = quantize_int8(values, block_size)
    assert codes.dtype == np.int8 and scales.dtype == np.float32
    assert scales.shape == (1 if block_size is None else -(-1000 // block_size),)
    decoded = dequantize_int8(codes, scales, block_size)
    per_element = np.repeat(scales, 1000 if block_size is None else block_size)[:1000]
    assert np.all(np.abs(decoded - values) <= per_element / 2 * (1 + 1e-6))
    # every block uses the full code range: its largest entry maps to +-127
    assert np.abs(codes).max() == 127


def test_int8_blockwise_is_finer_than_per_tensor_when_magnitudes_differ() -> None:
    values = np.concatenate([np.full(64, 1e-4), np.full(64, 1.0)]).astype(np.float32)
    values[::3] *= -0.37
    err = {
        b: np.abs(dequantize_int8(*quantize_int8(values, b), b) - values)[:64].max()
        for b in (None, 64)
    }
    assert err[64] < err[None] / 100


def test_int8_zero_block_and_non_finite_values() -> None:
    values = np.zeros(10, np.float32)
    values[7] = np.nan
    codes, scales = quantize_int8(values, 5)
    decoded = dequantize_int8(codes, scales, 5)
    assert np.all(decoded[:5] == 0) and scales[0] == 0
    # a NaN stays visible after decoding (the server's screening rejects it)
    assert not np.all(np.isfinite(decoded[5:]))


def test_topk_keeps_the_largest_entries_exactly_and_the_residual_holds_the_rest() -> None:
    reference = {"w": np.zeros((10, 10), np.float32)}
    local = {"w": np.random.default_rng(4).normal(size=(10, 10)).astype(np.float32)}
    encoded, residual = encode_update(local, reference, Codec("topk", topk_fraction=0.2), {})
    assert encoded.arrays["index"].dtype == np.int32
    assert encoded.arrays["index"].shape == (20,) == encoded.arrays["value"].shape
    sent = decode_delta(encoded, reference)["w"]
    kept = sent != 0
    assert kept.sum() == 20
    np.testing.assert_array_equal(sent[kept], local["w"][kept])  # bit-exact
    assert np.abs(local["w"][~kept]).max() <= np.abs(local["w"][kept]).min()
    assert residual is not None
    np.testing.assert_array_equal(sent + residual["w"], local["w"])
    np.testing.assert_array_equal(residual["w"][kept], 0)


def test_error_feedback_makes_the_sum_of_sent_updates_converge() -> None:
    """The same update every round: with error feedback the total sent approaches the total
    computed (the gap is one residual, bounded); without it the dropped mass grows."""
    rng = np.random.default_rng(5)
    update = {"w": rng.normal(size=500).astype(np.float32)}
    reference = {"w": np.zeros(500, np.float32)}
    codec = Codec("topk", topk_fraction=0.05)
    rounds = 200
    total_ef, total_plain = np.zeros(500), np.zeros(500)
    residual: dict[str, np.ndarray] | None = {}
    gaps = []
    for r in range(1, rounds + 1):
        encoded, residual = encode_update(update, reference, codec, residual)
        total_ef += decode_delta(encoded, reference)["w"]
        total_plain += decode_delta(encode_update(update, reference, codec)[0], reference)["w"]
        gaps.append(np.linalg.norm(total_ef - r * update["w"]) / np.linalg.norm(r * update["w"]))
    assert residual is not None
    np.testing.assert_allclose(total_ef + residual["w"], rounds * update["w"], rtol=1e-4)
    assert gaps[-1] < 0.05 and gaps[-1] < gaps[49] < gaps[9] < gaps[0]
    plain_gap = np.linalg.norm(total_plain - rounds * update["w"]) / np.linalg.norm(
        rounds * update["w"]
    )
    assert plain_gap > 0.5  # without feedback 95% of the entries are never sent


def test_topk_count_rounds_up_and_keeps_at_least_one() -> None:
    assert topk_count(1000, 0.1) == 100 and topk_count(7, 0.1) == 1
    assert topk_count(3, 1.0) == 3 and topk_count(0, 0.5) == 0
    indices, kept = sparsify_topk(np.array([0.1, -5.0, 2.0]), 1.0)
    assert indices.tolist() == [0, 1, 2] and kept.tolist() == pytest.approx([0.1, -5.0, 2.0])


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.scales}")
def test_encoded_bytes_shrink_as_the_codec_promises(codec: Codec) -> None:
    reference = {"w": np.zeros((64, 64, 16), np.float32)}
    local = {"w": np.random.default_rng(6).normal(size=(64, 64, 16)).astype(np.float32)}
    ratio = encode_update(local, reference, codec)[0].nbytes / reference["w"].nbytes
    expected = (
        {"none": 1.0, "fp16": 0.5, "topk": 2 * 0.25}[codec.name]
        if codec.name != ("int8")
        else (0.25 + (1 / 16 if codec.scales == "blockwise" else 0.0))
    )
    assert ratio == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "zip"}, "codec 'zip' is unknown"),
        ({"name": "topk", "topk_fraction": 0.0}, r"topk_fraction must be in \(0, 1\]"),
        ({"name": "topk", "topk_fraction": 1.5}, r"topk_fraction must be in \(0, 1\]"),
        ({"name": "int8", "block_size": 0}, "block_size must be >= 1"),
        ({"name": "int8", "scales": "per_row"}, "scales 'per_row' is unknown"),
    ],
)
def test_bad_codec_settings_are_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(CompressionError, match=match):
        Codec(**kwargs)


def test_mismatched_tensors_are_clear_errors() -> None:
    reference = model()
    local = trained(reference)
    with pytest.raises(CompressionError, match=r"missing \['conv.bias'\]"):
        encode_update({k: v for k, v in local.items() if k != "conv.bias"}, reference, Codec())
    with pytest.raises(CompressionError, match=r"'conv.weight' has shape"):
        encode_update({**local, "conv.weight": np.zeros((2, 2), np.float32)}, reference, Codec())
    encoded, _ = encode_update(local, reference, Codec("int8"))
    # decoding against another model: the packed sizes, or a pass-through tensor, differ
    with pytest.raises(
        CompressionError, match="'int8' holds 329 int8 entries; the global model needs 332 int8"
    ):
        decode_update(encoded, {**reference, "other": np.zeros(3, np.float32)})
    with pytest.raises(CompressionError, match=r"missing \['step::raw'\]"):
        decode_update(encoded, {**reference, "step": np.zeros(1, np.int64)})
    broken = dict(encoded.arrays)
    del broken["scale"]
    broken["stray"] = np.zeros(1)
    with pytest.raises(CompressionError, match=r"missing \['scale'\], unexpected \['stray'\]"):
        decode_update(EncodedUpdate(encoded.codec, broken), reference)
    with pytest.raises(
        CompressionError, match="'scale' holds 4 float32 entries; the global model needs 23 float32"
    ):
        decode_update(EncodedUpdate(Codec("int8", block_size=16), encoded.arrays), reference)
    fp32 = {"fp16": encoded.arrays["int8"].astype(np.float32)}
    with pytest.raises(CompressionError, match="'fp16' holds 329 float32 entries"):
        decode_update(
            EncodedUpdate(Codec("fp16"), {**fp32, "norm.num_batches_tracked::raw": np.array(1)}),
            reference,
        )
    topk, _ = encode_update(local, reference, Codec("topk", topk_fraction=0.5))
    # packed in sorted name order: conv.bias (2 kept of 4) comes first
    index = topk.arrays["index"].copy()
    index[1] = 99
    with pytest.raises(CompressionError, match=r"tensor 'conv.bias' .*out of range"):
        decode_update(EncodedUpdate(topk.codec, {**topk.arrays, "index": index}), reference)


def test_codec_header_round_trips_and_missing_keys_are_named() -> None:
    codec = Codec("int8", scales="per_tensor", block_size=64, topk_fraction=0.3)
    assert Codec.from_header(codec.header()) == codec
    with pytest.raises(CompressionError, match="lacks"):
        Codec.from_header({"name": "int8"})
    with pytest.raises(CompressionError, match="non-numeric"):
        Codec.from_header({**codec.header(), "block-size": "big"})


def test_compression_config_group_and_validation() -> None:
    for name in ("none", "fp16", "int8", "topk"):
        assert compose("demo", [f"compression={name}"]).compression.codec == name
    assert compose("demo", ["compression=topk"]).compression.error_feedback
    with pytest.raises(ConfigError, match=r"compression.topk_fraction must be in \(0, 1\]"):
        compose("demo", ["compression=topk", "compression.topk_fraction=2"])
    with pytest.raises(ConfigError, match=r"compression.codec 'zip' is unknown"):
        compose("demo", ["compression.codec=zip"])
    with pytest.raises(ConfigError, match=r"compression.error_feedback=true does nothing"):
        compose("demo", ["compression.error_feedback=true"])


def _run(codec: str, sites: list[Path], root: Path) -> tuple[LocalGrid, list[dict], dict]:
    overrides = [
        *tiny_overrides(sites, root / codec),
        "model=unet_small",
        "strategy.cross_site_epochs=0",
        f"compression={codec}",
    ]
    plan = compose("demo", overrides)
    run = RunFolder.create(root / codec / "outputs", plan.name, plan_to_yaml(plan))
    grid = LocalGrid(overrides)
    summary = server.run_federation(grid, plan, run, run_id=1)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    return grid, rows, summary


def test_an_int8_run_sends_a_quarter_of_the_bytes_up_and_still_trains(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    runs = {codec: _run(codec, tiny_sites, tmp_path) for codec in ("none", "int8", "topk")}
    up, down = {}, {}
    for codec, (_, rows, summary) in runs.items():
        sent = [r for r in rows if "bytes_up" in r]
        assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in sent), codec
        # a validation a train message carried (strategy.evaluate_in_train) has no bytes
        # of its own: they are in that message's train row
        last = max(r["round"] for r in rows)
        assert all(r["split"] == "val" and r["round"] < last for r in rows if r not in sent)
        train = {(r["round"], r["site"]): r for r in rows if r["split"] == "train"}
        up[codec] = {k: r["bytes_up"] for k, r in train.items()}
        down[codec] = {k: r["bytes_down"] for k, r in train.items()}
        # the summary adds up every message of every round, both ways
        assert summary["codec"] == codec
        assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in sent)
        assert summary["bytes_down_total"] == sum(r["bytes_down"] for r in sent)
        assert summary["bytes_per_round"]["1"]["up"] == sum(
            r["bytes_up"] for r in sent if r["round"] == 1
        )
    for key, sent in up["int8"].items():
        assert 0.24 <= sent / up["none"][key] <= 0.28, (key, sent, up["none"][key])
        # top-k 10%: int32 index + float32 value per kept entry
        assert 0.18 <= up["topk"][key] / up["none"][key] <= 0.23
    assert down["int8"] == down["none"]  # the global model goes down uncompressed
    dice = {c: s["dice_mean_per_round"] for c, (_, _, s) in runs.items()}
    assert dice["int8"]["2"] > dice["int8"]["0"] + 0.05, dice
    assert abs(dice["int8"]["2"] - dice["none"]["2"]) < 0.05, dice
    # error feedback: the top-k sites keep their residual; int8 (no feedback) keeps none
    assert all("compression-residual" in c.state for c in runs["topk"][0].contexts.values())
    assert not any("compression-residual" in c.state for c in runs["int8"][0].contexts.values())


def test_the_report_states_the_bytes_sent() -> None:
    summary = {
        "codec": "int8",
        "bytes_up_total": 2_500_000,
        "bytes_down_total": 10_000_000,
        "bytes_per_round": {"0": {}, "1": {}},
    }
    assert traffic_line(summary) == (
        "bytes sent (update codec int8): up 2.50 MB, down 10.00 MB over 2 rounds "
        "(all sites, train and evaluate)"
    )
    assert traffic_line({"rounds_completed": 3}) is None  # a run from before bytes were kept


class MisencodingGrid(TamperingGrid):
    """hospital_a sends raw weights instead of an update; hospital_b encodes with fp16."""

    def tamper(self, reply: Message, received: ArrayRecord) -> None:
        if reply.metadata.src_node_id == 1:
            weights = sent_weights(reply, received)
            del reply.content["update"], reply.content["codec"]
            reply.content["arrays"] = to_record(weights)
        elif reply.metadata.src_node_id == 2:
            send_weights(reply, sent_weights(reply, received), received, Codec("fp16"))


def test_updates_the_server_cannot_decode_are_rejected_naming_the_site(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    overrides = [
        *tiny_overrides(tiny_sites, tmp_path),
        "rounds=1",
        "strategy.min_sites=1",
        "strategy.cross_site_epochs=0",
    ]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    summary = server.run_federation(MisencodingGrid(overrides), plan, run, run_id=1)

    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    rejected = {r["site"]: r["reason"] for r in rows if r.get("status") == "rejected"}
    assert set(rejected) == {"hospital_a", "hospital_b"}
    assert "lacks the ['update', 'codec']" in rejected["hospital_a"]
    assert "encoded as Codec(name='fp16'" in rejected["hospital_b"]
    assert "the federation uses Codec(name='none'" in rejected["hospital_b"]
    assert summary["rejected_updates"] == 2 and summary["rounds_completed"] == 1
