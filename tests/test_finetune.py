"""Accuracy recovery: QAT that never hands back worse than PTQ, its exports, and calibration remedies."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sample_models as sm
from analysis.cli import main
from analysis.config import ConfigError, QATConfig, QuantConfig
from analysis.data import Dataset
from analysis.evaluate import Evaluator
from analysis.finetune import remedies
from analysis.formats import parse_format
from analysis.loading import load_data, model_fingerprint
from analysis.precision_map import LayerPrecision, PrecisionMap, load_map
from analysis.provenance import file_sha256
from analysis.qat import QATError, check_labels, finetune_qat, split_train_validation
from analysis.qat.instrument import LSQWeight, unfold_into
from analysis.quantsim import QuantSim

MLP_LAYERS = ["fc1", "fc2", "fc3"]
MINMAX = QuantConfig(weight_calibration="minmax", act_calibration="minmax")


def _data(split: str, n: int | None = None, name: str = "mlp") -> Dataset:
    return load_data(f"sample:{name}", split).take(n)


@pytest.fixture(scope="module")
def mlp():
    return sm.load_model("mlp")


def _w4a8(quant: QuantConfig | None = None) -> PrecisionMap:
    return PrecisionMap({n: LayerPrecision("int4", "int8") for n in MLP_LAYERS}, quant=quant or QuantConfig())


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- keep-best, divergence, validation split --------------------------------------------------


def test_a_diverging_learning_rate_returns_the_ptq_model(mlp):
    train, held_out = _data("calibration", 128), _data("evaluation", 200)
    before = _state(mlp)
    result = finetune_qat(mlp, _w4a8(), train, train, evaluation=held_out,
                          config=QATConfig(lr=1e30, epochs=3, patience=0))
    assert result.stopped == "diverged" and result.kept == "ptq" and result.best_epoch == 0
    assert result.qat is None and result.returned == result.ptq
    assert all(torch.equal(before[k], v) for k, v in result.model.state_dict().items())  # the PTQ weights, unchanged
    assert result.model is not mlp and all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    diverged = [note for note in result.notes if "diverged" in note]
    assert len(diverged) == 1 and "\n" not in diverged[0] and "--lr" in diverged[0] and "1e+30" in diverged[0]


def test_training_that_only_hurts_keeps_the_ptq_weights_unless_asked(mlp):
    # A finite but far too large step: every epoch ends worse on validation than PTQ did.
    train, held_out = _data("calibration", 128), _data("evaluation", 200)
    config = QATConfig(lr=0.5, epochs=2, warmup_epochs=0, patience=0, loss="task")
    best = finetune_qat(mlp, _w4a8(), train, train, evaluation=held_out, config=config)
    assert best.stopped == "completed" and len(best.history) == 3
    assert all(h.val_loss > best.history[0].val_loss for h in best.history[1:])
    assert best.kept == "ptq" and best.returned == best.ptq and best.qat is not None and best.qat < best.ptq
    assert model_fingerprint(best.model) == model_fingerprint(mlp)
    assert any(note.startswith("QAT did not beat PTQ") for note in best.notes)
    last = finetune_qat(mlp, _w4a8(), train, train, evaluation=held_out, config=QATConfig(**{**config.__dict__, "keep": "last"}))
    assert last.kept == "qat" and last.returned == last.qat and model_fingerprint(last.model) != model_fingerprint(mlp)


def test_the_validation_split_is_disjoint_from_the_training_split():
    data = _data("calibration")
    split = split_train_validation(data, 0.2, seed=5)
    train_rows, val_rows = set(split.train_index.tolist()), set(split.validation_index.tolist())
    assert not train_rows & val_rows and train_rows | val_rows == set(range(len(data)))
    assert len(val_rows) == round(0.2 * len(data))
    assert torch.equal(split.train.inputs, data.inputs[split.train_index])
    assert torch.equal(split.validation.labels, data.labels[split.validation_index])
    # No validation sample appears among the training inputs, by content either.
    assert not (split.validation.inputs[:, None, :] == split.train.inputs[None, :, :]).all(-1).any(-1).any() \
        or len(torch.unique(data.inputs, dim=0)) < len(data)
    assert torch.equal(split_train_validation(data, 0.2, seed=5).validation_index, split.validation_index)
    assert not torch.equal(split_train_validation(data, 0.2, seed=6).validation_index, split.validation_index)


def test_finetune_states_where_its_validation_split_came_from(mlp):
    train = _data("calibration", 100)
    result = finetune_qat(mlp, _w4a8(), train, train, config=QATConfig(epochs=0))
    assert (result.train_samples, result.validation_samples) == (80, 20)
    assert "20 of the 100 training samples held out for validation" in result.validation_source
    assert any("held out for validation" in line for line in result.summary())
    given = finetune_qat(mlp, _w4a8(), train, train, validation=_data("evaluation", 30), config=QATConfig(epochs=0))
    assert (given.train_samples, given.validation_samples) == (100, 30)


def test_learning_rate_warms_up_then_follows_a_cosine(mlp):
    train = _data("calibration", 40)  # 32 training samples, batch 16: 2 steps per epoch
    config = QATConfig(lr=1e-3, epochs=4, warmup_epochs=1, batch_size=16, patience=0)
    result = finetune_qat(mlp, _w4a8(), train, train, config=config)
    lrs = [h.lr for h in result.history[1:]]
    # End of epoch 1: warm-up done (lr); then cosine over the 6 remaining steps: cos(pi*2/6), cos(pi*4/6), cos(pi).
    expected = [1e-3, 0.5e-3 * (1 + math.cos(math.pi / 3)), 0.5e-3 * (1 + math.cos(2 * math.pi / 3)), 0.0]
    assert lrs == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow  # 4-40 s on the shared 2-core machine: up to 30 epochs with a validation pass each
def test_qat_recovers_at_least_half_of_the_ptq_drop_on_held_out_data(mlp):
    # Min/max weight ranges keep each training step cheap; benchmarks/bench_qat.py measures the defaults.
    train, held_out = _data("calibration"), _data("evaluation")
    before = _state(mlp)
    result = finetune_qat(mlp, _w4a8(QuantConfig(weight_calibration="minmax")), train, train, evaluation=held_out)
    assert result.fp32 - result.ptq >= 0.5  # the map hurts: 97.8 -> 97.2 measured
    assert result.kept == "qat" and result.returned >= result.ptq
    assert result.recovered >= 0.5  # measured: 97.6, 67 % of the drop
    assert type(result.model) is type(mlp)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_qat_is_deterministic_for_a_seed(mlp):
    train, held_out = _data("calibration", 64), _data("evaluation", 100)
    config = QATConfig(epochs=2, lr=1e-3, batch_size=16, seed=3, keep="last")
    a, b = (finetune_qat(mlp, _w4a8(), train, train, evaluation=held_out, config=config) for _ in range(2))
    assert a.history[1:] != () and [h.train_loss for h in a.history] == [h.train_loss for h in b.history]
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_bad_labels_are_refused_in_one_line(mlp):
    output = torch.zeros(4, 10)
    check_labels(Dataset(torch.zeros(4, 64), torch.tensor([0, 3, 9, 1]), "classification", "ok"), output)
    with pytest.raises(QATError, match=r"outside the model's 10 classes \(ids 0\.\.9\): 12"):
        check_labels(Dataset(torch.zeros(4, 64), torch.tensor([0, 3, 12, 1]), "classification", "bad"), output)
    with pytest.raises(QATError, match="not class indices"):
        check_labels(Dataset(torch.zeros(4, 64), torch.tensor([0.5, 1, 2, 3]), "classification", "float"), output)
    data = _data("calibration", 64)
    shifted = Dataset(data.inputs, data.labels + 1, "classification", "shifted")  # 1..10 for a 10-class model
    with pytest.raises(QATError, match=r"outside the model's 10 classes \(ids 0\.\.9\): 10"):
        finetune_qat(mlp, _w4a8(), shifted, data, config=QATConfig(epochs=1))


def test_qat_config_refuses_nonsense_in_one_line():
    for bad in ({"lr": 0}, {"lr": float("nan")}, {"epochs": -1}, {"batch_size": 0}, {"validation_fraction": 1.0},
                {"ranges": "magic"}, {"loss": "hinge"}, {"keep": "worst"}):
        with pytest.raises(ConfigError) as info:
            QATConfig(**bad)
        assert "\n" not in str(info.value)


# --- the training graph ------------------------------------------------------------------------


def test_unfolding_batchnorm_gives_back_exactly_the_trained_folded_weights():
    cnn = sm.load_model("cnn")
    data = _data("calibration", 16, "cnn")
    sim = QuantSim(cnn, data)
    prepared, _ = sim.trainable_copy()
    tuned = prepared.graph_module
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    mine = unfold_into(cnn, tuned, prepared.folded_batchnorms)
    assert type(mine) is type(cnn) and prepared.folded_batchnorms
    refolded = dict(QuantSim(mine, data).gm.named_parameters())
    for name, param in tuned.named_parameters():
        assert torch.equal(refolded[name], param), name  # fold(unfold(w)) == w, bit for bit
    torch.testing.assert_close(mine(data.inputs), tuned(data.inputs), rtol=1e-5, atol=1e-5)
    assert not torch.equal(mine.stem[0].weight, cnn.stem[0].weight)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([2, 3, 4, 8]), asym=st.booleans(),
       rows=st.integers(1, 6), cols=st.integers(1, 40))
def test_lsq_weights_sit_on_their_grid_and_pass_gradients_straight_through(seed, bits, asym, rows, cols):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    fmt = parse_format(f"int{bits}{'-asym' if asym else ''}", "weight")
    quantizer = LSQWeight(weight, fmt, 0, "minmax", 99.99)
    w = weight.clone().requires_grad_(True)
    q = quantizer(w)
    s, z = quantizer.scale.detach(), quantizer.zero_point
    # Naive reference, element by element: the integer grid, clamped, then back to float.
    for i in range(rows):
        for j in range(cols):
            level = min(max(round(float(weight[i, j] / s[i, 0]) + float(z[i, 0])), fmt.qmin), fmt.qmax)
            assert float(q[i, j]) == pytest.approx((level - float(z[i, 0])) * float(s[i, 0]), rel=1e-5, abs=1e-6)
    q.sum().backward()
    levels = [[round(float(weight[i, j] / s[i, 0]) + float(z[i, 0])) for j in range(cols)] for i in range(rows)]
    inside = torch.tensor([[float(fmt.qmin <= v <= fmt.qmax) for v in row] for row in levels])
    # straight through where the level is on the grid, zero where it was clipped
    torch.testing.assert_close(w.grad, inside, rtol=1e-6, atol=0)
    assert quantizer.scale.grad is not None and torch.isfinite(quantizer.scale.grad).all()


# --- the CLI, the fine-tuned map and its exports -----------------------------------------------


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    _w4a8(MINMAX).save(root / "map.json")
    argv = ["finetune", "sample:mlp", "--data", "sample:mlp", "--map", str(root / "map.json"), "--epochs", "3",
            "--lr", "1e-3", "--keep", "last", "--quiet", "--out", str(root / "tuned.safetensors")]
    assert main(argv) == 0
    return root


def test_the_fine_tuned_maps_provenance_names_the_new_weights(tuned_run, mlp):
    tuned = load_map(tuned_run / "tuned.map.json")
    provenance = tuned.provenance
    assert provenance["weights"] == str(tuned_run / "tuned.safetensors")
    assert provenance["weights_sha256"] == file_sha256(tuned_run / "tuned.safetensors")
    assert tuned.model == provenance["model_fingerprint"] != model_fingerprint(mlp)
    assert provenance["fine_tuned_from"]["model_fingerprint"] == model_fingerprint(mlp)
    assert provenance["model_spec"].endswith("models.py:DigitsMLP")
    assert tuned.layers == _w4a8(MINMAX).layers and tuned.quant == MINMAX


def test_evaluate_on_the_fine_tuned_map_reproduces_the_reported_figure(tuned_run, capsys):
    out = tuned_run / "eval.json"
    assert main(["evaluate", "--data", "sample:mlp", "--map", str(tuned_run / "tuned.map.json"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows[1]["metric"] == pytest.approx(load_map(tuned_run / "tuned.map.json").measured["metric"], abs=1e-9)


def test_exports_after_qat_carry_the_fine_tuned_weights_and_their_ranges(tuned_run, mlp, capsys):
    enc_path = tuned_run / "enc.json"
    assert main(["export", str(tuned_run / "tuned.map.json"), "--to", "aimet", "--data", "sample:mlp",
                 "--out", str(enc_path)]) == 0
    enc = json.loads(enc_path.read_text())
    from safetensors.torch import load_file

    tuned_weights = load_file(tuned_run / "tuned.safetensors")
    calibration = _data("calibration")
    # Naive ranges from the fine-tuned weights: symmetric int4 min/max per output row, absmax / 7.5;
    # asymmetric int8 min/max of each layer's input over the calibration data, (hi - lo) / 255.
    inputs = {}
    tuned_model = copy.deepcopy(mlp)
    tuned_model.load_state_dict(tuned_weights)
    hooks = [getattr(tuned_model, n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
             for n in MLP_LAYERS]
    with torch.no_grad():
        tuned_model(calibration.inputs)
    for hook in hooks:
        hook.remove()
    # aimet-torch's load_encodings layout: one entry per channel under the parameter's name, the
    # input's under its module; AIMET rebuilds scales from min/max, nudged by a few float32 steps
    # where a weight sits on a rounding tie (see analysis.export.aimet).
    params = {name: [e["scale"] for e in entries] for name, entries in enc["param_encodings"].items()}
    acts = {module: entry["input"]["0"][0] for module, entry in enc["activation_encodings"].items()}
    for layer in MLP_LAYERS:
        w = tuned_weights[f"{layer}.weight"]
        torch.testing.assert_close(torch.tensor(params[f"{layer}.weight"]), w.abs().amax(1) / 7.5,
                                   rtol=1e-5, atol=0)
        original = mlp.get_parameter(f"{layer}.weight").abs().amax(1) / 7.5
        assert not torch.allclose(torch.tensor(params[f"{layer}.weight"]), original, rtol=1e-4, atol=0)
        x = inputs[layer]
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        assert acts[layer]["scale"] == pytest.approx((hi - lo) / 255, rel=1e-5)


def test_finetune_cli_refuses_bad_labels_in_one_line(tmp_path, capsys):
    data = _data("calibration", 64)
    torch.save({"inputs": data.inputs, "labels": data.labels + 5}, tmp_path / "bad.pt")
    _w4a8().save(tmp_path / "map.json")
    code = main(["finetune", "sample:mlp", "--data", "sample:mlp", "--train-data", str(tmp_path / "bad.pt"),
                 "--map", str(tmp_path / "map.json"), "--quiet", "--out", str(tmp_path / "t.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "outside the model's 10 classes (ids 0..9)" in err
    assert not (tmp_path / "t.safetensors").exists()


# --- calibration remedies ------------------------------------------------------------------------


def _planted(model: torch.nn.Module) -> torch.nn.Module:
    """Same FP32 function, but fc2 gets an outlier input channel (x50) and an outlier output row (x20)."""
    planted = copy.deepcopy(model)
    with torch.no_grad():
        planted.fc1.weight[5] *= 50
        planted.fc1.bias[5] *= 50
        planted.fc2.weight[:, 5] /= 50
        planted.fc2.weight[7] *= 20
        planted.fc2.bias[7] *= 20
        planted.fc3.weight[:, 7] /= 20
    return planted


def test_remedies_find_smoothquant_and_per_channel(mlp):
    model = _planted(mlp)
    calibration, evaluation = _data("calibration", 128), _data("evaluation", 200)
    x = evaluation.inputs
    assert torch.allclose(model(x), mlp(x), atol=1e-4)
    entries = remedies(model, calibration, evaluation, "fc2", "int8-pt", "int8")
    by_name = {e["remedy"]: e for e in entries}
    assert by_name["baseline"]["gain_db"] == 0.0
    smooth = next(e for e in entries if e["remedy"].startswith("SmoothQuant"))
    assert smooth["gain_db"] > 3.0  # measured ~+20 dB: the outlier channel moves into the weight
    assert by_name["per-channel weights"]["gain_db"] > 0.0
    measured = [e["output_sqnr_db"] for e in entries if e["output_sqnr_db"] is not None]
    assert measured == sorted(measured, reverse=True)
    assert {"remedy", "output_sqnr_db", "gain_db"} <= set(entries[0])


def test_remedies_reject_an_unknown_layer(mlp):
    with pytest.raises(ValueError, match="unknown layer"):
        remedies(mlp, _data("calibration", 32), None, "nope", "int8")


def test_unfolded_batchnorm_updates_its_statistics_only_until_frozen():
    cnn = sm.load_model("cnn")
    data = _data("calibration", 64, "cnn")
    pmap = PrecisionMap({n: LayerPrecision("int4", "int8") for n in ["stem.0", "pw1.0", "pw2.0", "fc"]},
                        quant=QuantConfig(fold_batchnorm=False))
    runs = {after: finetune_qat(cnn, pmap, data, data, config=QATConfig(epochs=1, lr=1e-3, patience=0, keep="last",
                                                                       freeze_bn_after=after))
            for after in (0, 1)}
    for after, result in runs.items():
        assert type(result.model) is type(cnn) and result.kept == "qat"
        moved = not torch.equal(result.model.stem[1].running_mean, cnn.stem[1].running_mean)
        assert moved == (after > 0), after  # frozen from the start: the statistics stay the trained model's
        assert not torch.equal(result.model.stem[0].weight, cnn.stem[0].weight)


def test_finetune_cli_refuses_an_exported_program_before_training(tmp_path, capsys, mlp):
    program = torch.export.export(mlp, (_data("calibration", 2).inputs,))
    torch.export.save(program, tmp_path / "mlp.pt2")
    _w4a8().save(tmp_path / "map.json")
    code = main(["finetune", str(tmp_path / "mlp.pt2"), "--data", "sample:mlp", "--map", str(tmp_path / "map.json"),
                 "--quiet", "--out", str(tmp_path / "t.safetensors")])
    captured = capsys.readouterr()
    assert code == 2 and len(captured.err.strip().splitlines()) == 1 and "exported program" in captured.err
    assert "held-out" not in captured.out and not (tmp_path / "t.safetensors").exists()


# --- timm's BatchNormAct2d: folded by the analysis, unfolded back after QAT -----------------------


class BatchNormAct2d(torch.nn.BatchNorm2d):
    """Built like timm's `timm.layers.BatchNormAct2d` (importing timm takes seconds): a BatchNorm2d
    subclass from outside torch.nn whose forward is `F.batch_norm` on its own buffers, then its
    `drop` and `act` submodules; tracing runs through it."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.drop = torch.nn.Identity()
        self.act = torch.nn.ReLU()

    def forward(self, x):
        x = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                           False, self.momentum, self.eps)
        return self.act(self.drop(x))


class ConvBNAct(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = BatchNormAct2d(8)
        self.head = torch.nn.Linear(8, 4)
        with torch.no_grad():  # statistics a trained network would have, not the identity
            self.bn1.running_mean.uniform_(-0.5, 0.5)
            self.bn1.running_var.uniform_(0.5, 2.0)
            self.bn1.weight.uniform_(0.5, 1.5)
            self.bn1.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        return self.head(self.bn1(self.conv(x)).mean((2, 3)))


def _conv_bn_act_data() -> Dataset:
    torch.manual_seed(3)
    return Dataset(torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,)), "classification", "images")


def test_a_folded_timm_batchnormact_unfolds_into_the_models_own_class():
    model, data = ConvBNAct().eval(), _conv_bn_act_data()
    sim = QuantSim(model, data)
    prepared, _ = sim.trainable_copy()
    assert prepared.folded_batchnorms == ("bn1",)
    tuned = prepared.graph_module
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    mine = unfold_into(model, tuned, prepared.folded_batchnorms)
    assert type(mine) is ConvBNAct
    # by hand: the BatchNorm now adds the folded bias and nothing else; the convolution has the folded weight
    torch.testing.assert_close(mine.conv.weight, tuned.get_submodule("conv").weight, rtol=0, atol=0)
    x = data.inputs
    expected = tuned.get_submodule("head")(torch.relu(torch.nn.functional.conv2d(
        x, tuned.get_submodule("conv").weight, tuned.get_submodule("conv").bias, padding=1)).mean((2, 3)))
    torch.testing.assert_close(mine(x), expected, rtol=1e-5, atol=1e-6)
    refolded = dict(QuantSim(mine, data).gm.named_parameters())
    for name in ("conv.weight", "conv.bias", "head.weight"):
        torch.testing.assert_close(refolded[name], dict(tuned.named_parameters())[name], rtol=1e-6, atol=1e-7)


def test_finetune_returns_a_timm_style_conv_batchnormact_model_in_its_own_class():
    model, data = ConvBNAct().eval(), _conv_bn_act_data()
    before = _state(model)
    pmap = PrecisionMap({"conv": LayerPrecision("int4", "int8"), "head": LayerPrecision("int4", "int8")},
                        quant=QuantConfig())
    result = finetune_qat(model, pmap, data, data, config=QATConfig(epochs=2, lr=1e-3, patience=0, keep="last"))
    assert result.kept == "qat" and type(result.model) is ConvBNAct
    assert not any("do not map back" in note for note in result.notes)
    assert not torch.equal(result.model.conv.weight, model.conv.weight)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    # the returned model is the one QAT measured: evaluating it again gives the reported figures
    again = Evaluator(result.model, data, data, pmap.quant).evaluate(pmap)
    assert again.output.sqnr_db == pytest.approx(result.qat_output_sqnr_db, rel=1e-4)
    assert again.metric == pytest.approx(result.qat)

