"""The registries are what every surface lists: the CLI, the dashboard's pickers and the README."""

from pathlib import Path

import pytest

from analysis.export import registry
from analysis.formats import FAMILIES, FormatError, example_formats, parse_format
from analysis.layers import LAYER_KINDS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_names_every_export_target():
    export_line = next(line for line in README.splitlines() if line.startswith("- `export --to`"))
    paragraph = README[README.index(export_line):README.index("\n-", README.index(export_line) + 1)]
    for name in registry.names():
        assert f"`{name}`" in paragraph, f"README's export list lacks {name}"


def test_readme_names_every_offered_format():
    formats = README[README.index("Formats: "):README.index("Layers: ")]
    for role in ("weight", "activation"):
        for name in example_formats(role):
            fmt = parse_format(name, role)
            shown = f"`int{fmt.bits}`" if fmt.kind == "int" else f"`{fmt.base}`"
            assert shown in formats or (fmt.kind == "int" and "`intN`" in formats), f"README's formats lack {name}"


def test_every_offered_format_parses_in_its_role_and_round_trips_qualified():
    for role in ("weight", "activation"):
        for name in example_formats(role):
            fmt = parse_format(name, role)
            assert parse_format(fmt.qualified_name(role), role) == fmt


def test_a_registered_format_family_is_parsed_and_listed():
    from analysis.formats import Format, FormatFamily, _quantize_identity, register_family

    family = FormatFamily("toy", lambda name, role, gran, text: Format("toy", 32, "toy") if name == "toy" else None,
                          _quantize_identity, None, "toy (a test family)", {"weight": ("toy",)})
    register_family(family)
    try:
        assert parse_format("toy").kind == "toy"
        assert "toy" in example_formats("weight")
        with pytest.raises(FormatError, match="toy \\(a test family\\)"):
            parse_format("nonsense")
    finally:
        del FAMILIES["toy"]
    with pytest.raises(FormatError):
        parse_format("toy")


def test_layer_kinds_cover_the_standard_modules():
    import torch.nn as nn

    from analysis.layers import layer_kind_for

    for module in (nn.Linear(2, 2), nn.Conv2d(1, 1, 1), nn.ConvTranspose1d(1, 1, 1), nn.Embedding(3, 2),
                   nn.MultiheadAttention(4, 2)):
        assert layer_kind_for(module) is not None, type(module).__name__
    assert layer_kind_for(nn.LayerNorm(3)) is None
    assert len({kind.name for kind in LAYER_KINDS}) == len(LAYER_KINDS)
