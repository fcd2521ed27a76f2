"""Every metric against a value computed by hand."""

import math

import pytest
import torch

from analysis.metrics import (
    SQNR_CAP_DB, ErrorAccumulator, accuracy, compare, perplexity, sqnr_db, sqnr_db_to_linear,
    sqnr_db_to_normalized_l2,
)


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
    ref = torch.randn(2, 3, 5)
    stats = compare(ref, ref.clone(), logits=True)
    assert stats.top1_agreement == 1.0 and stats.kl == pytest.approx(0.0, abs=1e-12)


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
