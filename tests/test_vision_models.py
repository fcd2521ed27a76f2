"""torchvision and timm models as users name them ("torchvision:resnet18", "timm:..."): every weighted
layer analysed, BatchNorm folded (timm's BatchNormAct2d included, its activation kept), and each
layer's weight-only int4 output SQNR checked against a naive reference written here, independently
of the engine: fold BatchNorm by hand in a copy of the real model, fake-quantize one weight per
output channel, run the real model, compare its output."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis import compat
from analysis.cli import main
from analysis.data import Dataset
from analysis.formats import parse_format
from analysis.graph import prepare_model
from analysis.loading import LoadError, load_model, model_fingerprint
from analysis.provenance import absolute_spec
from analysis.quantsim import QuantlensWarning, QuantSim
from analysis.config import AnalysisConfig, QuantConfig
from analysis.sweep import Sweep


def _library(name: str):
    try:
        return getattr(compat, f"import_{name}")()
    except ImportError as exc:
        pytest.skip(f"{name} is not installed (optional extra: pip install -e \".[vision]\"): {exc}")


@pytest.fixture(scope="module")
def torchvision():
    return _library("torchvision")


@pytest.fixture(scope="module")
def timm():
    return _library("timm")


def _images(n: int = 4, size: int = 32, seed: int = 1) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset(torch.randn(n, 3, size, size, generator=generator), None, "other", "synthetic")


def _perturb_batchnorms(model: nn.Module, seed: int = 2) -> None:
    """Freshly built BatchNorm is the identity (mean 0, var 1, scale 1, shift 0), which would make a
    missing or wrong fold invisible, and lets the signal of a deep random network fade (its output
    then hardly depends on the input). As after training: a random affine part, and running
    statistics measured on data (random images here), so every layer's output stays near unit scale."""
    generator = torch.Generator().manual_seed(seed)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for module in batchnorms:
            module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the batches below
        if batchnorms:
            model.train()
            for _ in range(2):
                model(torch.randn(8, 3, 32, 32, generator=generator))
            model.eval()


# --- the naive reference ---------------------------------------------------------------------------


def _conv_batchnorm_pairs(model: nn.Module, inputs: torch.Tensor) -> dict[str, str]:
    """BatchNorm name -> name of the convolution whose output it reads, found by running the model
    with hooks (the BatchNorm's input is the very tensor the convolution returned)."""
    outputs: list[tuple[str, torch.Tensor]] = []
    pairs: dict[str, str] = {}

    def after_conv(name):
        return lambda module, args, out: outputs.append((name, out))

    def before_bn(name):
        def hook(module, args):
            pairs[name] = next((conv for conv, out in outputs if out is args[0]), None)
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv(name)))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(before_bn(name)))
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return pairs


def _fold_by_hand(model: nn.Module, pairs: dict[str, str]) -> nn.Module:
    """A copy of `model` with each BatchNorm folded into its convolution: w·γ/√(σ²+ε), (b−μ)·γ/√(σ²+ε)+β.
    The BatchNorm is replaced by what it does after normalising (timm's dropout + activation)."""
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for bn_name, conv_name in pairs.items():
            bn, conv = folded.get_submodule(bn_name), folded.get_submodule(conv_name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            after = [getattr(bn, part) for part in ("drop", "act") if hasattr(bn, part)]
            parent, _, attr = bn_name.rpartition(".")
            setattr(folded.get_submodule(parent) if parent else folded, attr, nn.Sequential(*after))
    return folded


def _int4_per_channel(weight: torch.Tensor, ties_as: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric int4, one range per output channel (axis 0), min-max: scale = max|w| / 7.5, codes −8..7,
    round half to even. A channel's extreme value always sits on a tie (±7.5 codes) and float32
    arithmetic may land it on either side; the convention allows both neighbours there (see
    tests/_grid_reference.py), so at ties only, `ties_as` (a quantized tensor) picks, if it holds one of them."""
    rows = weight.detach().double().reshape(weight.shape[0], -1)
    top = torch.maximum(rows.amax(dim=1).clamp(min=0), (-rows.amin(dim=1)).clamp(min=0))
    scale = torch.where(top > 0, top / 7.5, torch.ones_like(top))[:, None]
    exact = rows / scale
    codes = torch.clamp(torch.round(exact), -8, 7)
    if ties_as is not None:
        theirs = torch.round(ties_as.detach().double().reshape(rows.shape) / scale)
        tie = (exact - exact.floor() - 0.5).abs() < 1e-4
        neighbour = (theirs == exact.floor().clamp(-8, 7)) | (theirs == exact.ceil().clamp(-8, 7))
        codes = torch.where(tie & neighbour, theirs, codes)
    return (codes * scale).reshape(weight.shape).to(weight.dtype)


def _sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Signal over error power in dB, capped at 100 dB as quantlens reports it (README, metrics)."""
    reference, other = reference.double(), other.double()
    noise = float((reference - other).pow(2).sum())
    return 100.0 if noise == 0 else min(100.0, 10 * math.log10(float(reference.pow(2).sum()) / noise))


def _weight_of(model: nn.Module, layer: str) -> nn.Parameter:
    if layer.endswith(".in_proj"):  # nn.MultiheadAttention's packed q/k/v projection
        return model.get_submodule(layer.removesuffix(".in_proj")).in_proj_weight
    return model.get_submodule(layer).weight


def _expected_layers(model: nn.Module) -> set[str]:
    """Every weighted layer, from the module tree: convolutions, linears, attention's packed projection."""
    names = {name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return names | {f"{name}.in_proj" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


# --- every weighted layer, numbers against the naive reference ------------------------------------

VISION_MODELS = {
    "resnet18": ("torchvision", "torchvision:resnet18?num_classes=10"),
    "mobilenet_v3_small": ("torchvision", "torchvision:mobilenet_v3_small?num_classes=10"),
    "efficientnet_b0": ("torchvision", "torchvision:efficientnet_b0?num_classes=10"),
    "vit_b_16": ("torchvision", "torchvision:vit_b_16?image_size=32&num_classes=10"),
    "timm_mobilenetv3": ("timm", "timm:mobilenetv3_small_050?num_classes=10"),  # BatchNormAct2d
    "timm_vit_tiny": ("timm", "timm:vit_tiny_patch16_224?img_size=32&num_classes=10"),
}


def _build(key: str) -> nn.Module:
    library, spec = VISION_MODELS[key]
    _library(library)
    model = load_model(spec)
    _perturb_batchnorms(model)
    if key == "vit_b_16":  # torchvision zero-initialises the head: the output would be constant
        with torch.no_grad():
            model.heads.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    return model


def _checked_layers(key: str, layers: set[str]) -> set[str]:
    """The layers compared with the reference: all of them, except in vit_b_16 (86M parameters),
    whose twelve encoder blocks are alike: there the first and last block, the patch embedding and the head."""
    if key != "vit_b_16":
        return layers
    inner = tuple(f"encoder.layers.encoder_layer_{i}." for i in range(1, 11))
    return {name for name in layers if not name.startswith(inner)}


@pytest.mark.parametrize("key", list(VISION_MODELS))
def test_every_weighted_layer_is_analysed_and_matches_the_naive_reference(key):
    model = _build(key)
    data = _images(n=2 if key == "vit_b_16" else 4)
    expected = _expected_layers(model)
    checked = _checked_layers(key, expected)
    config = AnalysisConfig(weight_formats=("int4",), act_formats=(), targets=("weights",),
                            weight_calibration="minmax", num_samples=len(data), layers=tuple(sorted(checked)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sweep = Sweep(model, data, config)
        result = sweep.run()
    assert not [w for w in caught if issubclass(w.category, QuantlensWarning)], [str(w.message) for w in caught]

    assert {layer.name for layer in sweep.sim.layers} == expected
    pairs = _conv_batchnorm_pairs(model, data.inputs)
    batchnorms = {name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert set(pairs) == batchnorms and None not in pairs.values()
    assert set(sweep.sim.prepared.folded_batchnorms) == batchnorms

    reference = _fold_by_hand(model, pairs).eval()
    int4 = parse_format("int4")
    with torch.no_grad():
        fp32 = model(data.inputs)
        assert _sqnr_db(fp32, reference(data.inputs)) > 90  # the hand fold computes the same function
        trials = {t.layer: t for t in result.trials}
        assert set(trials) == checked and not [t.error for t in trials.values() if t.error]
        for layer in sorted(checked):
            weight = _weight_of(reference, layer)
            original = weight.detach().clone()
            engine = sweep.sim.quantized_weight(layer, int4)
            naive_weight = _int4_per_channel(original, ties_as=engine)
            torch.testing.assert_close(engine, naive_weight, rtol=1e-5, atol=1e-7)
            weight.copy_(naive_weight)
            naive = _sqnr_db(fp32, reference(data.inputs))
            weight.copy_(original)
            assert trials[layer].output.sqnr_db == pytest.approx(naive, abs=0.5), layer


# --- BatchNorm folding ----------------------------------------------------------------------------


def test_timm_batchnormact_folds_into_its_convolution_and_keeps_the_activation(timm):
    model = load_model("timm:mobilenetv3_small_050?num_classes=10")
    _perturb_batchnorms(model)
    bn, conv = model.bn1, model.conv_stem
    assert type(bn).__name__ == "BatchNormAct2d" and isinstance(bn.act, nn.Hardswish)
    sim = QuantSim(model, _images(), QuantConfig(num_samples=4))

    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    analysed = sim.table.weight("conv_stem")
    torch.testing.assert_close(analysed, conv.weight * scale.reshape(-1, 1, 1, 1), rtol=1e-6, atol=1e-7)
    folded_conv = sim.gm.get_submodule("conv_stem")
    torch.testing.assert_close(folded_conv.bias, bn.bias - bn.running_mean * scale, rtol=1e-6, atol=1e-7)
    assert "bn1" in sim.prepared.folded_batchnorms
    assert any(s.name == "bn1" and "folded" in s.reason for s in sim.table.skipped)
    graph = sim.prepared.graph_module.graph
    assert not [n for n in graph.nodes if n.op == "call_function" and n.target is F.batch_norm]
    act = next(n for n in graph.nodes if n.op == "call_module" and n.target == "bn1.act")
    drop = act.args[0]
    assert drop.target == "bn1.drop" and drop.args[0].target == "conv_stem"  # the activation reads the conv
    assert conv.weight.shape == analysed.shape and not torch.equal(conv.weight, analysed)  # the user's model is untouched


class NormAct(nn.BatchNorm2d):
    """A BatchNorm + ReLU module from outside torch.nn (tracing runs through it), as timm writes them."""

    def forward(self, x):
        return torch.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps))


class ConvNormAct(nn.Module):
    def __init__(self, residual: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = NormAct(8)
        self.head = nn.Conv2d(8, 4, 1)
        self.residual = residual

    def forward(self, x):
        y = self.conv(x)
        z = self.norm(y)
        return self.head(z + y if self.residual else z).mean(dim=(2, 3))


@pytest.mark.parametrize("residual", [False, True])
def test_a_traced_batchnorm_subclass_folds_only_where_exact(residual):
    torch.manual_seed(0)
    model = ConvNormAct(residual).eval()
    _perturb_batchnorms(model)
    prepared = prepare_model(model)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(prepared.graph_module(x), model(x), rtol=1e-5, atol=1e-5)
    # With a residual the convolution's raw output is read twice: folding would change the sum.
    assert prepared.folded_batchnorms == (() if residual else ("norm",))
    calls = [n for n in prepared.graph_module.graph.nodes if n.op == "call_function" and n.target is F.batch_norm]
    assert len(calls) == (1 if residual else 0)


def test_the_constant_output_warning_fires_on_vit_b_16_with_its_zero_initialised_head(torchvision):
    model = load_model("torchvision:vit_b_16?image_size=32&num_classes=10")
    assert not model.heads.head.weight.any()  # as torchvision builds it
    with pytest.warns(QuantlensWarning, match="same for every input"):
        QuantSim(model, _images(n=2), QuantConfig(num_samples=2))


# --- the model spec -------------------------------------------------------------------------------


def test_library_specs_build_with_options_the_same_weights_every_time(torchvision):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_model("torchvision:resnet18?num_classes=7")
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random state is left alone
    second = load_model("torchvision:resnet18?num_classes=7")
    assert first.fc.out_features == 7 and not first.training
    assert model_fingerprint(first) == model_fingerprint(second)
    assert model_fingerprint(first) != model_fingerprint(load_model("torchvision:resnet18?num_classes=8"))
    small = load_model("torchvision:mobilenet_v3_small?num_classes=3&width_mult=0.5&dropout=0.0")
    assert small.classifier[-1].out_features == 3 and small.features[0][0].out_channels == 8


def test_library_weights_load_from_a_local_state_dict(torchvision, tmp_path):
    from safetensors.torch import save_file

    trained = load_model("torchvision:mobilenet_v3_small?num_classes=5")
    with torch.no_grad():
        trained.classifier[-1].weight.mul_(3.0)
    path = tmp_path / "trained.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    loaded = load_model("torchvision:mobilenet_v3_small?num_classes=5", weights=str(path))
    assert model_fingerprint(loaded) == model_fingerprint(trained)
    with pytest.raises(LoadError, match="classifier"):
        load_model("torchvision:mobilenet_v3_small?num_classes=6", weights=str(path))


@pytest.mark.parametrize("spec,needle", [
    ("torchvision:resnet1", "did you mean resnet18"),
    ("torchvision:resnet18?weights=DEFAULT", "never downloads"),
    ("torchvision:resnet18?num_classes", "not key=value"),
    ("torchvision:resnet18?num_classes=3&num_classes=4", "given twice"),
    ("torchvision:resnet18?no_such_option=1", "unexpected keyword argument 'no_such_option'"),
    ("torchvision:fasterrcnn_resnet50_fpn", "detection model"),
    ("torchvision:quantized_resnet18", "already quantized"),
    ("torchvision:", "names no torchvision model"),
    ("timm:resnet18.a1_in1k", "names pretrained weights"),
    ("timm:resnet18?pretrained=true", "never downloads"),
])
def test_bad_library_specs_are_refused_in_one_line(torchvision, timm, spec, needle):
    with pytest.raises(LoadError, match=needle) as caught:
        load_model(spec)
    assert "\n" not in str(caught.value)


def test_option_values_are_typed():
    from analysis.loading.libraries import _parse_options

    options = _parse_options("x", "a=10&b=0.5&c=true&d=False&e=none&f=avg&g=-3")
    assert options == {"a": 10, "b": 0.5, "c": True, "d": False, "e": None, "f": "avg", "g": -3}
    assert type(options["a"]) is int and type(options["b"]) is float


def test_provenance_keeps_a_library_spec_as_a_name():
    assert absolute_spec("torchvision:resnet18?num_classes=10") == "torchvision:resnet18?num_classes=10"
    assert absolute_spec("timm:vit_tiny_patch16_224") == "timm:vit_tiny_patch16_224"
    assert absolute_spec("net.py:build").endswith("/net.py:build")


def test_cli_analyses_a_timm_model_and_suggest_rebuilds_it(timm, tmp_path, capsys):
    data = tmp_path / "images.npz"
    np.savez(data, inputs=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "run"
    spec = "timm:mobilenetv3_small_050?num_classes=10"
    assert main(["analyze", spec, "--data", str(data), "--out", str(out), "--weight-formats", "int8,int4",
                 "--act-formats", "none", "--targets", "weights", "--weight-calibration", "minmax", "--quiet"]) == 0
    assert main(["suggest", str(out), "--budget", "avg-bits=6", "--front-points", "0"]) == 0  # same weights again
    assert main(["analyze", "timm:mobilenetv3_small", "--data", str(data), "--out", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("quantlens: error:") and "did you mean" in err[-1]
