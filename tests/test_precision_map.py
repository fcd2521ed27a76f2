"""Precision maps: round trips, hand edits, and every rejection a user can trigger."""

import json

import pytest

from analysis.config import QuantConfig
from analysis.precision_map import SCHEMA, LayerPrecision, MapError, PrecisionMap, load_map, map_from_dict


Q = QuantConfig().to_dict()


def sample_map():
    return PrecisionMap({"fc1": LayerPrecision("int8", "int8"), "fc2": LayerPrecision("int4-g32")},
                        model="abc123", quant=QuantConfig(weight_calibration="mse"),
                        budget={"kind": "avg-bits", "value": 5.0}, predicted={"output_sqnr_db": 30.0})


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    path = sample_map().save(tmp_path / f"map{suffix}")
    assert load_map(path) == sample_map()


def test_hand_written_shorthand_and_defaults():
    pmap = map_from_dict({"schema": SCHEMA, "quant": QuantConfig().to_dict(), "layers": {"fc1": "int4"}, "default": {"weight": "int8", "activation": "int8"}})
    assignment = pmap.assignment(["fc1", "fc2"])
    assert assignment["fc1"][0].bits == 4 and assignment["fc1"][1] is None
    assert assignment["fc2"][0].bits == 8 and assignment["fc2"][1].bits == 8


@pytest.mark.parametrize("payload,needle", [
    ({"schema": "other/1", "layers": {}}, "schema"),
    ({"schema": SCHEMA, "quant": Q}, "layers"),
    ({"schema": SCHEMA, "quant": Q, "layers": {"fc1": {"weight": "int9"}}}, "int9"),
    ({"schema": SCHEMA, "quant": Q, "layers": {"fc1": {"weight": "int8", "precision": 3}}}, "unknown key"),
    ({"schema": SCHEMA, "quant": Q, "layers": {"fc1": 42}}, "fc1"),
    ([1, 2], "object"),
])
def test_malformed_maps_are_rejected_with_one_line(payload, needle):
    with pytest.raises(MapError) as info:
        map_from_dict(payload)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_unknown_layers_and_other_models_are_rejected():
    pmap = sample_map()
    with pytest.raises(MapError, match="does not have: fc2"):
        pmap.validate(["fc1", "fc3"])
    with pytest.raises(MapError, match="made for model abc123"):
        pmap.validate(["fc1", "fc2"], fingerprint="ffff")
    pmap.validate(["fc1", "fc2"], fingerprint="abc123")


def test_invalid_files(tmp_path):
    broken = tmp_path / "map.json"
    broken.write_text("{not json")
    with pytest.raises(MapError, match="not valid JSON"):
        load_map(broken)
    with pytest.raises(MapError, match="not found"):
        load_map(tmp_path / "missing.json")
    (tmp_path / "map.yaml").write_text("layers: [unclosed")
    with pytest.raises(MapError, match="not valid YAML"):
        load_map(tmp_path / "map.yaml")
    assert json.loads(sample_map().dumps())["schema"] == SCHEMA


def test_a_map_without_its_quant_block_is_refused():
    # Losing the block would silently change how every layer is calibrated.
    with pytest.raises(MapError, match="quant"):
        map_from_dict({"schema": SCHEMA, "layers": {"fc1": "int4"}})


def test_quant_block_is_strict():
    bad = dict(QuantConfig().to_dict(), percentile="abc")
    with pytest.raises(MapError, match="percentile") as info:
        map_from_dict({"schema": SCHEMA, "quant": bad, "layers": {}})
    assert "\n" not in str(info.value)
    extra = dict(QuantConfig().to_dict(), colour="blue")
    with pytest.raises(MapError, match="unknown key"):
        map_from_dict({"schema": SCHEMA, "quant": extra, "layers": {}})
    missing = QuantConfig().to_dict()
    del missing["percentile"]
    with pytest.raises(MapError, match="missing percentile"):
        map_from_dict({"schema": SCHEMA, "quant": missing, "layers": {}})


def test_names_are_stored_fully_qualified_and_mean_the_same_everywhere():
    pmap = map_from_dict({"schema": SCHEMA, "quant": Q, "layers": {"a": "int4", "b": {"weight": "int4-g32", "activation": "int8"},
                                                                  "c": "fp8_e4m3"}})
    assert pmap.to_dict()["layers"] == {"a": {"weight": "int4-sym-pc"},
                                        "b": {"weight": "int4-sym-g32", "activation": "int8-asym-pt"},
                                        "c": {"weight": "fp8_e4m3-pc"}}
    again = map_from_dict(json.loads(json.dumps(pmap.to_dict())))
    assert again == pmap and again.assignment(["a", "b", "c"]) == pmap.assignment(["a", "b", "c"])


def test_schema_1_maps_still_load(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema": "quantlens.precision-map/1", "model": "abc",
                                "calibration": {"weight": "minmax", "granularity": "per-tensor", "samples": 64},
                                "layers": {"fc1": {"weight": "int4", "activation": "int8"}}}))
    pmap = load_map(path)
    assert pmap.quant.weight_calibration == "minmax" and pmap.quant.num_samples == 64
    assert pmap.layers["fc1"] == LayerPrecision("int4-sym-pt", "int8-asym-pt")


def test_yaml_alias_bombs_and_special_files_are_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                    "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n")
    with pytest.raises(MapError, match="alias"):
        load_map(bomb)
    with pytest.raises(MapError, match="regular file"):
        load_map(tmp_path)
