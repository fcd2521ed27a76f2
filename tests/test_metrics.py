"""Every metric against a value computed by hand."""

import dataclasses
import json
import math

import pytest
import torch

from analysis.formats import parse_format
from analysis.metrics import (
    NONFINITE, SQNR_CAP_DB, ErrorAccumulator, ErrorHistogram, accuracy, compare, perplexity, sqnr_db,
    sqnr_db_to_linear, sqnr_db_to_normalized_l2,
)
from analysis.trials import Trial, TrialSums, finish_trial


def test_sqnr_hand_computed():
    # signal power 3² + 4² = 25, noise power 0.1² + 0.2² = 0.05 -> 10·log10(500) = 26.9897 dB
    ref = torch.tensor([3.0, 4.0])
    q = torch.tensor([3.1, 3.8])
    assert sqnr_db(ref, q) == pytest.approx(10 * math.log10(500), abs=1e-4)


def test_mse_cosine_max_error_hand_computed():
    ref = torch.tensor([1.0, 0.0, -1.0, 2.0])
    q = torch.tensor([1.0, 0.5, -1.0, 1.0])
    stats = compare(ref, q)
    assert stats.mse == pytest.approx((0.25 + 1.0) / 4)
    # dot = 1 + 0 + 1 + 2 = 4; |ref| = sqrt 6, |q| = sqrt 3.25
    assert stats.cosine == pytest.approx(4 / math.sqrt(6 * 3.25))
    assert stats.max_abs_error == pytest.approx(1.0)
    assert stats.count == 4


def test_sqnr_sums_over_all_samples_not_mean_of_batches():
    # batch A: signal 100, noise 1 (20 dB); batch B: signal 1, noise 1 (0 dB).
    # Pooled: 101 / 2 -> 17.03 dB; a mean of per-batch dB would say 10 dB.
    acc = ErrorAccumulator()
    acc.update(torch.tensor([10.0]), torch.tensor([9.0]))
    acc.update(torch.tensor([1.0]), torch.tensor([0.0]))
    assert acc.result().sqnr_db == pytest.approx(10 * math.log10(101 / 2))


def test_zero_error_is_capped_and_zero_signal_is_floored():
    x = torch.tensor([1.0, 2.0])
    assert sqnr_db(x, x) == SQNR_CAP_DB
    assert compare(x, x).cosine == pytest.approx(1.0)
    assert sqnr_db(torch.zeros(2), x) == -SQNR_CAP_DB


def test_kl_and_top1_hand_computed():
    # P = softmax([0, 0]) = (0.5, 0.5); Q = softmax([ln 3, 0]) = (0.75, 0.25)
    # KL(P‖Q) = 0.5·ln(0.5/0.75) + 0.5·ln(0.5/0.25) = 0.5·ln(4/3) ... = 0.1438 nats
    ref = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    q = torch.tensor([[math.log(3.0), 0.0], [0.0, 2.0]])
    stats = compare(ref, q, logits=True)
    kl_first = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    kl_second = float((p * (p.log() - p.flip(0).log())).sum())
    assert stats.kl == pytest.approx((kl_first + kl_second) / 2, rel=1e-6)
    # argmax: row 0 ties -> index 0 for both; row 1 differs
    assert stats.top1_agreement == pytest.approx(0.5)


def test_language_model_logits_count_tokens():
    # [2 sequences, 3 tokens, 5 classes]: one token's prediction changes. Per token that is 5 of 6
    # agreeing (per sequence it would be 1 of 2), and the KL is that token's divergence over 6.
    ref = torch.zeros(2, 3, 5)
    ref[..., 0] = 2.0  # every token predicts class 0
    q = ref.clone()
    q[1, 2] = torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0])  # the last token now predicts class 1
    stats = compare(ref, q, logits=True)
    assert stats.top1_agreement == pytest.approx(5 / 6)
    p = torch.softmax(ref[1, 2].double(), 0)
    one_token = float((p * (p.log() - torch.log_softmax(q[1, 2].double(), 0))).sum())
    assert stats.kl == pytest.approx(one_token / 6, rel=1e-9)
    assert compare(ref, ref.clone(), logits=True).kl == pytest.approx(0.0, abs=1e-12)


def test_shape_mismatch_and_empty_input_errors():
    with pytest.raises(ValueError, match="shapes"):
        compare(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        ErrorAccumulator().result()


def test_conversions_to_other_tools_units():
    assert sqnr_db_to_linear(20.0) == pytest.approx(100.0)
    assert sqnr_db_to_normalized_l2(20.0) == pytest.approx(0.1)


def test_task_metrics_hand_computed():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    uniform = torch.zeros(1, 2, 4)  # uniform over 4 tokens -> perplexity 4
    assert perplexity(uniform, torch.tensor([[1, 3]])) == pytest.approx(4.0)


# --- shards: state, from_state, merge ------------------------------------------------------------


def _batches(n, logits=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ref = torch.randn(3, 4, 7, generator=generator) * 10.0 ** (i - 1)  # batches of very different scale
        out.append((ref, ref + 0.05 * torch.randn(ref.shape, generator=generator)))
    return out


def _through_json(acc):
    return ErrorAccumulator.from_state(json.loads(json.dumps(acc.state(), allow_nan=False)))


def test_state_round_trips_exactly_through_json():
    acc = ErrorAccumulator(logits=True)
    for ref, q in _batches(3):
        acc.update(ref, q)
    again = _through_json(acc)
    assert again.state() == acc.state() and again.result() == acc.result()
    assert _through_json(ErrorAccumulator()).state() == ErrorAccumulator().state()


@pytest.mark.parametrize("logits", [False, True])
def test_merged_shards_equal_one_accumulator(logits):
    batches = _batches(5, logits)
    whole = ErrorAccumulator(logits)
    for ref, q in batches:
        whole.update(ref, q)
    # A then B: two shards add their sums once, so that is exact
    a, b = ErrorAccumulator(logits), ErrorAccumulator(logits)
    for ref, q in batches[:3]:
        a.update(ref, q)
    for ref, q in batches[3:]:
        b.update(ref, q)
    a = _through_json(a)
    a.merge(_through_json(b))
    two = ErrorAccumulator(logits)
    two.update(*batches[0])
    two.update(*batches[1])
    first, second = ErrorAccumulator(logits), ErrorAccumulator(logits)
    first.update(*batches[0])
    second.update(*batches[1])
    first.merge(second)
    assert first.state() == two.state()
    # more shards regroup the float64 sums: counts, max and agreement exact, sums within 1e-12
    shards = [ErrorAccumulator(logits) for _ in batches]
    for shard, (ref, q) in zip(shards, batches):
        shard.update(ref, q)
    merged = ErrorAccumulator(logits)
    for shard in reversed(shards):
        merged.merge(shard)
    for candidate in (a, merged):
        got, want = candidate.state(), whole.state()
        for key in ("logits", "count", "distributions", "max_abs", "agree", "nonfinite"):
            assert got[key] == want[key], key
        for key in ("signal", "noise", "dot", "quant_power", "kl_sum"):
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=0.0), key
    assert dataclasses.astuple(merged.result()) == pytest.approx(dataclasses.astuple(whole.result()), rel=1e-12)


def test_merging_an_empty_accumulator_changes_nothing_and_mismatches_are_refused():
    acc = ErrorAccumulator()
    acc.update(*_batches(1)[0])
    before = acc.state()
    acc.merge(ErrorAccumulator())
    assert acc.state() == before
    empty = ErrorAccumulator()
    empty.merge(acc)
    assert empty.state() == before
    with pytest.raises(ValueError, match="logits=True into one with logits=False"):
        acc.merge(ErrorAccumulator(logits=True))
    with pytest.raises(ValueError, match="not an ErrorAccumulator state"):
        ErrorAccumulator.from_state({"count": 3})
    with pytest.raises(ValueError, match="count must be a non-negative integer"):
        ErrorAccumulator.from_state({**before, "count": 2.5})


def test_non_finite_values_are_reported_by_result_not_update():
    acc = ErrorAccumulator(logits=True)
    acc.update(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.5]]))
    acc.update(torch.tensor([[1.0, 2.0]]), torch.tensor([[float("nan"), 2.0]]))  # no device read here
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.result()
    state = json.loads(json.dumps(acc.state(), allow_nan=False))  # still strict JSON
    assert state["nonfinite"] is True
    clean = ErrorAccumulator(logits=True)
    clean.update(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.5]]))
    clean.merge(ErrorAccumulator.from_state(state))  # a bad shard spoils the merged comparison
    with pytest.raises(ValueError, match="NaN or Inf"):
        clean.result()


def test_the_sweep_turns_a_deferred_non_finite_into_a_failed_trial():
    acc = TrialSums(ErrorAccumulator(), ErrorAccumulator())
    acc.local.update(torch.ones(4), torch.ones(4))
    acc.output.update(torch.ones(2), torch.tensor([1.0, float("inf")]))
    acc.error_histogram.update(torch.zeros(4))
    result = finish_trial(Trial("fc", "weights", parse_format("int8"), None), acc)
    assert not result.ok and result.error == f"ValueError: {NONFINITE}"
    fresh = TrialSums(ErrorAccumulator(), None)
    with pytest.raises(ValueError, match="NaN or Inf"):  # a non-finite first chunk: the sweep records it
        fresh.error_histogram.update(torch.tensor([0.5, float("nan")]))


def test_error_histogram_shards_merge_exactly_when_they_share_edges():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=generator), 3 * torch.randn(1000, generator=generator)
    whole = ErrorHistogram(16)
    whole.update(a)
    whole.update(b)  # wider than the first chunk: clipped into the end bins, as in the sweep
    first = ErrorHistogram(16)
    first.update(a)
    second = ErrorHistogram(16, bound=first.bound)  # a later data shard starts from the first's edges
    second.update(b)
    merged = ErrorHistogram.from_state(json.loads(json.dumps(first.state())))
    merged.merge(ErrorHistogram.from_state(json.loads(json.dumps(second.state()))))
    assert merged.result() == whole.result()
    edges, counts = merged.result()
    assert len(edges) == len(counts) + 1 and sum(counts) == 2000
    empty = ErrorHistogram()
    empty.merge(merged)
    assert empty.result() == whole.result() and ErrorHistogram().result() is None
    own_edges = ErrorHistogram(16)
    own_edges.update(b)
    with pytest.raises(ValueError, match="different edges .* start every data shard"):
        first.merge(own_edges)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation only exists with a GPU")
def test_updates_never_wait_for_the_gpu():
    ref = torch.randn(64, 10, device="cuda")
    acc, hist = ErrorAccumulator(logits=True), ErrorHistogram(bound=1.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            acc.update(ref, ref + 0.01)
            hist.update(ref * 0.01)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert acc.result().count == 3 * 640 and sum(hist.result()[1]) == 3 * 640


@pytest.mark.parametrize("scale", [1.0, 1e25, 1e-25])  # 1.0: binned in place; the others: normalised path
def test_histogram_fed_by_the_accumulator_matches_numpy_and_float64_sums(scale):
    """The sweep counts local errors through ErrorAccumulator.update(histogram=...): the counts must be
    those of quantized − reference binned independently (numpy, float64 edges), and the sums, max and
    SQNR those of a float64 computation, at ordinary and extreme scales, with a padding mask."""
    import numpy as np

    generator = torch.Generator().manual_seed(3)
    ref = torch.randn(4, 6, 50, generator=generator) * scale
    q = ref + 0.02 * scale * torch.randn(ref.shape, generator=generator)
    q[0, 0, :3] += 0.5 * scale  # a few large errors: the end bins are used
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[3, 4:] = False
    acc, hist = ErrorAccumulator(), ErrorHistogram(32)
    acc.update(ref, q, mask, histogram=hist)
    acc.update(ref[:1], q[:1], histogram=hist)  # a second chunk, binned with the first one's edges
    errors = [(q[mask] - ref[mask]).double().numpy().ravel(), (q[:1] - ref[:1]).double().numpy().ravel()]
    bound = 1.25 * np.abs(errors[0]).max()
    assert hist.bound == pytest.approx(bound, rel=1e-6)
    expected = sum(np.histogram(np.clip(e, -bound, bound * (1 - 1e-12)), bins=32, range=(-bound, bound))[0]
                   for e in errors)
    edges, counts = hist.result()
    # an error on a bin edge may fall either side in float32; nothing else may differ
    assert sum(counts) == sum(e.size for e in errors)
    assert np.abs(np.asarray(counts) - expected).sum() <= 2
    r = np.concatenate([ref[mask].double().numpy().ravel(), ref[:1].double().numpy().ravel()])
    e = np.concatenate(errors)
    stats = acc.result()
    assert stats.mse == pytest.approx((e ** 2).mean(), rel=1e-5)
    assert stats.max_abs_error == pytest.approx(np.abs(e).max(), rel=1e-6)
    assert stats.sqnr_db == pytest.approx(10 * math.log10((r ** 2).sum() / (e ** 2).sum()), abs=1e-4)
    assert stats.cosine == pytest.approx(float(np.dot(r, r + e) / np.linalg.norm(r) / np.linalg.norm(r + e)), abs=1e-6)


def test_histogram_fed_by_the_accumulator_leaves_the_callers_tensors_alone():
    ref = torch.linspace(-1, 1, 101)
    q = ref + 0.01
    before_ref, before_q = ref.clone(), q.clone()
    ErrorAccumulator().update(ref, q, histogram=ErrorHistogram(8))
    assert torch.equal(ref, before_ref) and torch.equal(q, before_q)
