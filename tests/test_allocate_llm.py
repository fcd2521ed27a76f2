"""The LLM menu: a Llama-architecture model allocated over NVFP4 / FP8 / bf16 with bf16 as the "keep"
option, q/k/v and gate/up sharing a format, and the recipe exports accepting the map."""

import json
import warnings

import pytest
import torch

from analysis import costs
from analysis.allocate import Budget, BudgetError, apply_groups, build_problem, default_groups, suggest
from analysis.config import QuantConfig
from analysis.formats import parse_format
from analysis.precision_map import LayerPrecision, PrecisionMap

pytestmark = pytest.mark.slow  # a transformers import and a Llama sweep


@pytest.fixture(scope="module")
def llama_result():
    from analysis.compat import import_torchvision

    try:  # transformers imports torchvision when it is installed; PyPI's wheel needs the shim
        import_torchvision()
    except ImportError:
        pass
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (quantlens[hf])")
    from analysis.data import Dataset
    from analysis.sweep import AnalysisConfig, analyze

    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).eval()
    ids = torch.randint(0, 64, (8, 8))
    config = AnalysisConfig(weight_formats=("nvfp4", "fp8_e4m3", "bf16"), act_formats=(), targets=("weights",),
                            num_samples=8)
    return analyze(lm, Dataset(ids, ids, "language-model", "tokens"), config)


def test_bf16_is_the_keep_option_at_16_bits(llama_result):
    problem = build_problem(llama_result, keep="bf16")
    total = sum(costs.weight_elements(layer) for layer in problem.layers)
    for layer, choices in zip(problem.layers, problem.choices):
        weights = {c.precision.weight for c in choices}
        assert weights == {"nvfp4", "fp8_e4m3-pc", "bf16"}  # no FP32: the model is deployed in bf16
        kept = next(c for c in choices if c.precision.weight == "bf16")
        assert kept.costs["avg-bits"] == pytest.approx(costs.weight_elements(layer) * 16 / total)
        nvfp4 = next(c for c in choices if c.precision.weight == "nvfp4")  # 4 bits + an E4M3 scale per 16
        assert nvfp4.costs["avg-bits"] == pytest.approx(costs.weight_elements(layer) * 4.5 / total)
        assert kept.noise > 0  # measured by the sweep, not assumed zero


def test_keeping_in_a_format_the_sweep_did_not_measure_is_refused(llama_result):
    with pytest.raises(BudgetError, match="no fp16 trial") as info:
        build_problem(llama_result, keep="fp16")
    assert "\n" not in str(info.value)


def test_mixed_menu_map_at_5_4_bits_shares_formats_in_groups_and_exports(llama_result, tmp_path):
    from analysis.export import export_map

    problem = build_problem(llama_result, keep="bf16")
    problem = apply_groups(problem, default_groups([layer.name for layer in problem.layers]))
    assert [len(g) for g in problem.groups] == [3, 2]  # q/k/v, gate/up
    suggestion = suggest(problem, Budget("avg-bits", 5.4))
    pmap = suggestion.map
    assert suggestion.totals["avg-bits"] <= 5.4 + 1e-9
    assert {p.weight for p in pmap.layers.values()} <= {"nvfp4", "fp8_e4m3-pc", "bf16"}
    for group in suggestion.groups:
        assert len({pmap.precision(name) for name in group}) == 1
    for target in ("compressed-tensors", "modelopt"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export_map(pmap, target, tmp_path / f"{target}.json")
        assert json.loads(path.read_text())


def test_recipe_exports_leave_bf16_kept_layers_unquantized_and_say_so():
    from analysis.export.compressed_tensors import compressed_tensors_config
    from analysis.export.modelopt import modelopt_quant_cfg
    from analysis.quantsim import QuantlensWarning

    pmap = PrecisionMap({"a": LayerPrecision("nvfp4"), "b": LayerPrecision("bf16")}, quant=QuantConfig())
    with pytest.warns(QuantlensWarning, match="kept in bf16 \\(b\\)"):
        config = compressed_tensors_config(pmap)
    assert config["quantization_config"]["ignore"] == ["b"]
    with pytest.warns(QuantlensWarning, match="kept in bf16"):
        entries = modelopt_quant_cfg(pmap)["quant_cfg"]
    assert [e["quantizer_name"] for e in entries] == ["*", "a.weight_quantizer"]
    assert parse_format("bf16", "weight").base == "bf16"
