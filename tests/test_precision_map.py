"""Precision maps: round trips, hand edits, and every rejection a user can trigger."""

import json

import pytest

from analysis.precision_map import SCHEMA, LayerPrecision, MapError, PrecisionMap, load_map, map_from_dict


def sample_map():
    return PrecisionMap({"fc1": LayerPrecision("int8", "int8"), "fc2": LayerPrecision("int4-g32")},
                        model="abc123", calibration={"weight_calibration": "mse"},
                        budget={"kind": "avg-bits", "value": 5.0}, predicted={"output_sqnr_db": 30.0})


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    path = sample_map().save(tmp_path / f"map{suffix}")
    assert load_map(path) == sample_map()


def test_hand_written_shorthand_and_defaults():
    pmap = map_from_dict({"schema": SCHEMA, "layers": {"fc1": "int4"}, "default": {"weight": "int8", "activation": "int8"}})
    assignment = pmap.assignment(["fc1", "fc2"])
    assert assignment["fc1"][0].bits == 4 and assignment["fc1"][1] is None
    assert assignment["fc2"][0].bits == 8 and assignment["fc2"][1].bits == 8


@pytest.mark.parametrize("payload,needle", [
    ({"schema": "other/1", "layers": {}}, "schema"),
    ({"schema": SCHEMA}, "layers"),
    ({"schema": SCHEMA, "layers": {"fc1": {"weight": "int9"}}}, "int9"),
    ({"schema": SCHEMA, "layers": {"fc1": {"weight": "int8", "precision": 3}}}, "unknown key"),
    ({"schema": SCHEMA, "layers": {"fc1": 42}}, "fc1"),
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
