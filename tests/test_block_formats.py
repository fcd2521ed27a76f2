"""FP4 E2M1, OCP MX and NVFP4: hand-computed examples, a naive element-by-element reference
(tests/_block_reference.py) compared exactly, hypothesis properties, costs, and per-layer output
SQNR on the sample models within 0.1 dB of the reference."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from analysis import costs
from analysis.formats import (
    ELEMENT_TYPES, FormatError, block_quantize, dynamic_quantize, mx_shared_exponent, parse_format,
)
from analysis.layers import Layer
from analysis.quantsim import quantize_weight
from tests import _block_reference as ref

BLOCK_NAMES = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8", "nvfp4"]
ALL_NAMES = BLOCK_NAMES + ["fp4_e2m1"]


def wq(w, name, calibration="minmax"):
    """The engine's weight quantizer (what QuantSim uses), per output channel along axis 0."""
    return quantize_weight(torch.as_tensor(w, dtype=torch.float32), parse_format(name), 0, calibration, 99.99)[0]


def aq(x, name, axis=-1):
    return block_quantize(torch.as_tensor(x, dtype=torch.float32), parse_format(name, "activation"), axis)


# --- hand-computed examples --------------------------------------------------------------------


def test_mxfp4_block_with_absmax_7_has_shared_exponent_0_and_saturates_7_to_6():
    element = ELEMENT_TYPES["fp4_e2m1"]
    assert int(mx_shared_exponent(torch.tensor(7.0), element)) == 0  # floor(log2 7) - emax 2
    block = [7.0, 0.3, 0.1, -2.6, 1.25] + [0.0] * 27
    # X = 1: 7 -> 6 (largest normal), 0.3 -> 0.5, 0.1 -> 0, -2.6 -> -3, 1.25 -> 1 (tie to even mantissa)
    assert wq([block], "mxfp4")[0, :5].tolist() == [6.0, 0.5, 0.0, -3.0, 1.0]


def test_mx_examples_for_each_element_type():
    # MXFP8 E4M3: absmax 1000 -> floor(log2) 9 - emax 8 -> X = 2; 1000/2 = 500 saturates at 448 -> 896;
    # -0.01/2 = -0.005 is subnormal (step 2^-9): 2.56 steps -> 3 -> -3·2^-9·2
    assert wq([[1000.0, 3.0, -0.01]], "mxfp8_e4m3")[0].tolist() == [896.0, 3.0, -3 * 2.0**-8]
    # MXFP8 E5M2: absmax 1 -> X = 2^-15; 0.3·2^15 = 9830.4 lies in [8192, 16384), step 2048 -> 10240
    assert wq([[1.0, 0.3]], "mxfp8_e5m2")[0].tolist() == [1.0, 10240 * 2.0**-15]
    # MXFP6 E2M3: absmax 7.5 -> X = 1; 0.1 is subnormal, step 1/8 -> 0.125
    assert wq([[7.5, 0.1, -5.3]], "mxfp6_e2m3")[0].tolist() == [7.5, 0.125, -5.5]
    # MXFP6 E3M2: absmax 28 -> X = 1; subnormal step 1/16: 0.1 -> 0.125; 27 -> 28 (step 4 in [16, 32))
    assert wq([[27.0, 0.1]], "mxfp6_e3m2")[0].tolist() == [28.0, 0.125]
    # MXINT8: absmax 100 -> floor(log2) 6 - emax 0 -> X = 64; 0.3 -> round(0.3/64·64)=0 ... codes k/64·X
    assert wq([[100.0, 0.3, -50.0]], "mxint8")[0].tolist() == [100.0, 0.0, -50.0]
    # MXINT8 with X = 1: 0.3 -> 19/64; 1.999 -> 127/64 (symmetric clamp, never 128/64)
    assert wq([[1.0, 0.3, 1.999]], "mxint8")[0].tolist() == [1.0, 19 / 64, 127 / 64]


def test_nvfp4_two_level_scale_by_hand():
    # T = 12 -> g = 12/2688. Block 1 (absmax 12): 12/6/g = 448 -> E4M3 448, scale 448·g = 2: 12 -> 6·2,
    # 1 -> 0.5·2. Block 2 (absmax 0.3): 0.3/6/g = 11.2 -> E4M3 11 (step 1 in [8, 16)), scale 11·g;
    # 0.3/scale = 6.11 -> 6: 6·11·12/2688.
    row = [12.0, 1.0] + [0.0] * 14 + [0.3, -0.1] + [0.0] * 14
    q = wq([row], "nvfp4")[0]
    scale2 = 11 * 12 / 2688
    assert q[0] == 12.0 and q[1] == 1.0
    assert float(q[16]) == pytest.approx(6 * scale2, rel=1e-6)
    assert float(q[17]) == pytest.approx(-2 * scale2, rel=1e-6)  # 0.1/scale2 = 2.04 -> 2


def test_fp4_e2m1_per_channel_scale_is_absmax_over_6():
    q = wq([[3.0, -1.2, 0.4, 0.0], [-6.0, 0.75, 0.25, 2.5]], "fp4_e2m1")
    # row 0: scale 0.5 -> 6, -2.4 -> -2, 0.8 -> 1; row 1: scale 1, ties to the even code:
    # 0.75 -> 1 (not 0.5), 0.25 -> 0 (not 0.5), 2.5 -> 2 (not 3)
    assert q[0].tolist() == [3.0, -1.0, 0.5, 0.0]
    assert q[1].tolist() == [-6.0, 1.0, 0.0, 2.0]


def test_a_last_partial_block_gets_its_own_scale():
    row = [100.0] * 32 + [0.01]
    q = wq([row], "mxfp4")[0]
    # 0.01: floor(log2) -7 - 2 -> X = 2^-9; 0.01·512 = 5.12 -> 6 (nearer than 4) -> 6/512
    assert q[32].item() == 6 / 512
    # along a conv input's channels, 33 channels -> blocks of 32 and 1, per pixel
    x = torch.tensor(row).reshape(1, 33, 1, 1)
    assert aq(x, "mxfp4", axis=1)[0, 32, 0, 0].item() == 6 / 512


def test_block_size_override_and_names():
    assert parse_format("mxfp4-b16").group_size == 16
    assert parse_format("mxfp4").group_size == 32 and parse_format("nvfp4").group_size == 16
    assert parse_format("mxfp4-b16").qualified_name("weight") == "mxfp4-b16"
    assert parse_format("mxfp4-b32").qualified_name("activation") == "mxfp4"
    for bad, hint in (("mxfp4-b7", "-b<block size>"), ("nvfp4-b32", "size 16"), ("mxfp4-g32", "-b<block size>"),
                      ("fp4_e2m1-g32", "mxfp4 or nvfp4")):
        with pytest.raises(FormatError, match=hint):
            parse_format(bad)
    with pytest.raises(FormatError, match="per-tensor"):
        parse_format("fp4_e2m1-pc", "activation")
    # the row grouping differs with the block size: 16 elements of 1 and 16 of 100 are separate blocks
    row = [1.0] * 16 + [100.0] * 16
    assert wq([row], "mxfp4-b16")[0, 0] == 1.0 and wq([row], "mxfp4")[0, 0] == 0.0


def test_effective_bits_include_scale_overhead():
    expected = {"mxfp4": 4.25, "mxfp6_e2m3": 6.25, "mxfp8_e4m3": 8.25, "mxint8": 8.25, "nvfp4": 4.5,
                "int4-g128": 4.125, "int4-g32": 4.5, "int8": 8.0, "fp8_e4m3": 8.0, "bf16": 16.0, "fp4_e2m1": 4.0}
    for name, bits in expected.items():
        assert costs.effective_bits(parse_format(name)) == bits, name
    assert costs.effective_bits(None) == 32.0
    layer = Layer("fc", "Linear", 4 * 40 + 4, (4, 40), 0, ("fc",), macs=160)  # 3 blocks of 16 per row (last partial)
    assert costs.weight_bits_total(layer, parse_format("nvfp4")) == 160 * 4 + 4 * 3 * 8 + 32 + 4 * 32
    assert costs.weight_bits_total(layer, parse_format("mxfp4")) == 160 * 4 + 4 * 2 * 8 + 4 * 32
    assert costs.weight_bits_total(layer, parse_format("fp4_e2m1")) == 160 * 4 + 4 * 32 + 4 * 32
    assert costs.bops(layer, parse_format("mxfp4"), parse_format("mxfp8_e4m3", "activation")) == 160 * 4.25 * 8.25


def test_block_formats_need_no_calibrated_range():
    for name in BLOCK_NAMES:
        fmt = parse_format(name)
        assert fmt.block_scaled and not fmt.scaled, name
    assert parse_format("fp4_e2m1").scaled and not parse_format("fp4_e2m1").block_scaled
    # The same weight quantizes identically whatever calibration method is configured (no range search).
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for name in BLOCK_NAMES:
        assert torch.equal(wq(w, name, "mse"), wq(w, name, "minmax")), name


def test_nan_and_inf_are_refused_with_one_line():
    for name in ALL_NAMES:
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="NaN or Inf") as info:
                wq([[1.0, bad, 2.0]], name)
            assert "\n" not in str(info.value)
    for name in BLOCK_NAMES:
        with pytest.raises(ValueError, match="NaN or Inf"):
            aq([[1.0, float("nan")]], name)


# --- against the naive reference -----------------------------------------------------------------

_TINY = float(np.float32(2.0**-120))
magnitudes = st.one_of(st.just(0.0), st.floats(_TINY, 1e4, width=32), st.floats(-1e4, -_TINY, width=32),
                       st.floats(-2.0**-10, 2.0**-10, width=32))


def matrices(max_cols=70):
    shapes = st.tuples(st.integers(1, 4), st.integers(1, max_cols))
    return shapes.flatmap(lambda shape: arrays("float32", shape, elements=magnitudes))


@settings(max_examples=40, deadline=None)
@given(w=matrices(), name=st.sampled_from(ALL_NAMES))
def test_weights_match_the_reference_exactly(w, name):
    fmt = parse_format(name)
    expected = ref.quantize_weight(w, name, fmt.group_size or w.shape[1])
    assert np.array_equal(wq(w, name).numpy(), expected)


@settings(max_examples=40, deadline=None)
@given(x=matrices(), name=st.sampled_from(BLOCK_NAMES), axis=st.sampled_from([0, 1]))
def test_activations_match_the_reference_exactly_along_either_axis(x, name, axis):
    fmt = parse_format(name, "activation")
    assert np.array_equal(aq(x, name, axis).numpy(), ref.quantize_activation(x, name, fmt.group_size, axis))


def test_conv_sites_block_along_channels_and_linear_sites_along_features():
    from analysis.data import Dataset
    from analysis.quantsim import QuantSim

    model = torch.nn.Sequential(torch.nn.Conv2d(40, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4 * 9, 3))
    sim = QuantSim(model, Dataset(torch.randn(4, 40, 3, 3, generator=torch.Generator().manual_seed(1))))
    fmt = parse_format("mxfp4", "activation")
    x = torch.randn(2, 40, 3, 3, generator=torch.Generator().manual_seed(2))
    conv_site, = sim.sites(sim.layer_names[0])
    got = sim.activation_quantizer(conv_site, fmt)(0, x)
    assert np.array_equal(got.numpy(), ref.quantize_activation(x.numpy(), "mxfp4", 32, axis=1))
    linear_site, = sim.sites(sim.layer_names[1])
    y = torch.randn(2, 36, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(sim.activation_quantizer(linear_site, fmt)(0, y).numpy(),
                          ref.quantize_activation(y.numpy(), "mxfp4", 32, axis=1))
    # whatever the configured activation mode, block formats never calibrate a range
    sim.calibrate_assignment({sim.layer_names[0]: (None, fmt)})
    assert sim.activation_histogram(conv_site) is None
    params, = sim.activation_params(sim.layer_names[0], fmt)
    assert params.dynamic and params.scale is None


# --- properties ---------------------------------------------------------------------------------


def _block_grid_step(x: np.ndarray, q_scale: np.ndarray, element) -> np.ndarray:
    """The grid step of an element type at each value (in the block's units)."""
    a = np.abs(x / q_scale)
    exponent = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    exponent = np.maximum(exponent, 1 - element.bias) if element.exponent_bits else np.full_like(a, 1 - element.bias)
    return 2.0 ** (exponent - element.mantissa_bits) * q_scale


@settings(max_examples=40, deadline=None)
@given(w=matrices(), name=st.sampled_from(ALL_NAMES))
def test_idempotent_and_sign_symmetric(w, name):
    q = wq(w, name)
    again = wq(q, name)
    if name == "nvfp4":  # the tensor scale is recomputed from q's absmax: equal up to float32 rounding
        np.testing.assert_allclose(again.numpy(), q.numpy(), rtol=2e-6, atol=0)
    else:
        assert torch.equal(again, q)
    assert torch.equal(wq(-torch.from_numpy(w), name), -q)


@settings(max_examples=40, deadline=None)
@given(w=matrices(), name=st.sampled_from([n for n in BLOCK_NAMES if n != "nvfp4"]))
def test_mx_error_is_at_most_half_a_step_of_the_blocks_grid_inside_the_range(w, name):
    fmt = parse_format(name)
    element = ELEMENT_TYPES[ref.MX[name]]
    q = wq(w, name).numpy().astype(np.float64)
    x = w.astype(np.float64)
    for r in range(x.shape[0]):
        for start in range(0, x.shape[1], fmt.group_size):
            block, qb = x[r, start:start + fmt.group_size], q[r, start:start + fmt.group_size]
            absmax = np.abs(block).max()
            if absmax == 0:
                assert not qb.any()  # an all-zero block stays zero
                continue
            scale = 2.0 ** max(-127, min(127, math.floor(math.log2(absmax)) - element.emax))
            inside = np.abs(block) <= element.max_normal * scale
            step = _block_grid_step(block, scale, element)
            assert np.all(np.abs(block - qb)[inside] <= step[inside] / 2)
            assert np.all(np.abs(qb) <= element.max_normal * scale)


def test_subnormal_elements_and_tiny_blocks():
    # FP4 E2M1's subnormal 0.5: a block with absmax 6 and an element 0.3 keeps it as 0.5
    assert wq([[6.0, 0.3]], "mxfp4")[0, 1] == 0.5
    # a block below 2^-127·2^emax clamps the shared exponent at -127 (E8M0's smallest): values whose
    # scaled magnitude falls under the smallest subnormal flush to zero, larger ones survive
    tiny = 2.0**-140
    q = wq(torch.tensor([[tiny, 2.0**-128]], dtype=torch.float32), "mxfp4")[0]
    assert q[0] == 0.0 and q[1] == 2.0**-128
    # NVFP4: a block whose E4M3 scale underflows to zero decodes to zero
    row = [1000.0] + [0.0] * 15 + [1e-9] + [0.0] * 15
    assert wq([row], "nvfp4")[0, 16] == 0.0


def test_dynamic_quantize_routes_block_formats_along_the_reduction_axis():
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    fmt = parse_format("mxfp4", "activation")
    assert torch.equal(dynamic_quantize(x, fmt, per_token=True), aq(x, "mxfp4", -1))
    x4 = torch.randn(2, 40, 2, 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(dynamic_quantize(x4, fmt, per_token=False), aq(x4, "mxfp4", 1))


# --- the 0.1 dB target: per-layer weight-only output SQNR vs the reference ----------------------------


def _sqnr(reference: torch.Tensor, out: torch.Tensor) -> float:
    ref64, out64 = reference.double(), out.double()
    noise = float(((ref64 - out64) ** 2).sum())
    return 100.0 if noise == 0 else 10 * math.log10(float((ref64**2).sum()) / noise)


@pytest.mark.parametrize("model_name", ["mlp", "cnn", pytest.param("transformer", marks=pytest.mark.slow)])
def test_per_layer_output_sqnr_agrees_with_the_reference_within_0_1_db(model_name):
    import sample_models
    from analysis.config import QuantConfig
    from analysis.data import Dataset
    from analysis.graph import primary_output
    from analysis.quantsim import QuantSim

    split = sample_models.load_split(model_name, "calibration")
    data = Dataset(split["inputs"][:8], split["labels"][:8])
    sim = QuantSim(sample_models.load_model(model_name), data, QuantConfig(weight_calibration="minmax"))
    inputs = sim.data.inputs
    fp32 = sim.forward(inputs)
    params = sim.param_names()
    # the transformer's second block repeats the first one's layer kinds and shapes: its first block,
    # embeddings and head cover every kind
    for layer in [layer for layer in sim.layers if not layer.name.startswith("blocks.1.")]:
        weight = sim.table.weight(layer.name).detach()
        moved = weight.movedim(layer.channel_axis, 0).numpy()
        for name in ALL_NAMES:
            fmt = parse_format(name)
            expected = ref.quantize_weight(moved, name, fmt.group_size or moved[0].size)
            ref_weight = torch.from_numpy(np.moveaxis(expected, 0, layer.channel_axis).copy())
            with torch.no_grad():
                ref_out = primary_output(torch.func.functional_call(sim.gm, {params[layer.name]: ref_weight}, (inputs,)))
            engine = _sqnr(fp32, sim.forward(inputs, {layer.name: (fmt, None)}))
            assert abs(engine - _sqnr(fp32, ref_out)) <= 0.1, (layer.name, name)


# --- real kernels: the plan and its refusals (no Blackwell GPU here) ------------------------------------


def test_real_plan_maps_block_formats_to_torchao_configs_and_keeps_them_float_off_blackwell():
    from analysis.precision_map import LayerPrecision, PrecisionMap
    from analysis.real.plan import _plan, block_kernel_reason

    layers = [Layer(name, "Linear", 64 * 64, (64, 64), 0, (name,)) for name in ("a", "b", "c", "d")]
    pmap = PrecisionMap({"a": LayerPrecision("mxfp4", "mxfp4"), "b": LayerPrecision("nvfp4", None),
                         "c": LayerPrecision("mxfp6_e2m3", None), "d": LayerPrecision("mxfp8_e4m3", "mxfp8_e4m3")})
    described = _plan(pmap, layers)  # formats only: what the configs would be
    assert described.specs["a"].config == "MXDynamicActivationMXWeightConfig"
    assert described.specs["a"].kwargs["weight_dtype"] == "torch.float4_e2m1fn_x2"
    assert described.specs["b"].config == "NVFP4WeightOnlyConfig"
    assert described.specs["d"].kwargs["activation_dtype"] == "torch.float8_e4m3fn"
    assert "torchao's block configs are" in described.unsupported["c"]
    on_cpu = _plan(pmap, layers, "cpu")
    assert not on_cpu.specs
    for name in ("a", "b", "d"):
        reason = on_cpu.unsupported[name]
        assert "compute capability 10.0+" in reason and "runs on cpu" in reason and "\n" not in reason
    assert block_kernel_reason("cpu") is not None
    # the configs named exist in the installed torchao and accept the arguments
    pytest.importorskip("torchao", reason="torchao not installed")
    for spec in described.specs.values():
        assert type(spec.build()).__name__ == spec.config


def test_real_path_leaves_block_layers_float_on_cpu_with_the_reason():
    import sample_models
    from analysis.precision_map import LayerPrecision, PrecisionMap
    from analysis.real import apply_real

    pytest.importorskip("torchao", reason="torchao not installed")
    model = sample_models.load_model("mlp")
    pmap = PrecisionMap({"fc1": LayerPrecision("nvfp4", None), "fc2": LayerPrecision("int8", None)})
    quantized, left = apply_real(model, pmap)
    assert "compute capability" in left["fc1"] and "fc2" not in left
    assert type(quantized.fc1.weight) is torch.nn.Parameter and type(quantized.fc2.weight) is not torch.nn.Parameter


def test_reports_label_formats_with_their_effective_bits():
    assert costs.bits_label("mxfp4") == "mxfp4 (4.25 bits)"
    assert costs.bits_label("nvfp4", "activation") == "nvfp4 (4.5 bits)"
    assert costs.bits_label("int4-g128") == "int4-g128 (4.125 bits)"


def test_allocator_menus_mix_families_at_effective_bits_without_borrowing_noise_across_them():
    from analysis.allocate.problem import _choice, _monotone
    from analysis.precision_map import LayerPrecision

    layer = Layer("fc", "Linear", 64 * 64, (64, 64), 0, ("fc",), macs=4096)

    def choice(name, noise):
        fmt = parse_format(name)
        return _choice(layer, LayerPrecision(fmt.qualified_name("weight")), fmt, None, noise, 4096)

    int4, mxfp4, int4_g32, fp32 = choice("int4", 5.0), choice("mxfp4", 9.0), choice("int4-g32", 6.0), choice("fp32", 0.0)
    assert mxfp4.costs["avg-bits"] == 4.25 and int4_g32.costs["avg-bits"] == 4.5 and int4.costs["avg-bits"] == 4.0
    assert mxfp4.costs["bops"] == 4096 * 4.25 * 32
    out = {c.precision.weight: c.noise for c in _monotone([int4, mxfp4, int4_g32, fp32])}
    # mxfp4 has more bits than int4 but is another family: it keeps its own (worse) noise
    assert out["mxfp4"] == 9.0
    # within the int family more bits never cost more noise
    assert out["int4-sym-g32"] == 5.0 and out["int4-sym-pc"] == 5.0
