"""Ensemble scores against hand-computed values and their identities."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from snapserve.proto import scores


def test_two_confident_members_that_disagree() -> None:
    p = np.array([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, M=2, C=2]
    np.testing.assert_allclose(scores.probabilities(p), [[0.5, 0.5]])
    np.testing.assert_allclose(scores.predictive_entropy(p), [math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(scores.expected_entropy(p), [0.0], atol=1e-7)
    np.testing.assert_allclose(scores.mutual_information(p), [math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(scores.member_kl(p), [[math.log(2), math.log(2)]], rtol=1e-6)
    np.testing.assert_array_equal(scores.member_top_class(p), [[0, 1]])
    # argmax ties go to class 0, so the member voting 1 disagrees
    np.testing.assert_allclose(scores.vote_disagreement(p), [0.5])


def test_members_that_agree_have_no_mutual_information() -> None:
    p = np.array([[[0.7, 0.2, 0.1]] * 4])
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    np.testing.assert_allclose(scores.predictive_entropy(p), [h], rtol=1e-6)
    np.testing.assert_allclose(scores.expected_entropy(p), [h], rtol=1e-6)
    np.testing.assert_allclose(scores.mutual_information(p), [0.0], atol=1e-7)
    np.testing.assert_allclose(scores.member_kl(p), np.zeros((1, 4)), atol=1e-7)
    np.testing.assert_allclose(scores.vote_disagreement(p), [0.0])


def test_hand_computed_three_members() -> None:
    p = np.array([[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])
    mean = np.array([1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(scores.probabilities(p), [mean], rtol=1e-6)
    np.testing.assert_allclose(scores.predictive_entropy(p), [math.log(3)], rtol=1e-6)
    np.testing.assert_allclose(scores.expected_entropy(p), [2 / 3 * math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(scores.mutual_information(p), [math.log(3) - 2 / 3 * math.log(2)],
                               rtol=1e-6)
    # KL([.5,.5,0] || 1/3) = log(1.5); KL([0,0,1] || 1/3) = log 3
    np.testing.assert_allclose(scores.member_kl(p), [[math.log(1.5), math.log(1.5), math.log(3)]],
                               rtol=1e-6)
    np.testing.assert_allclose(scores.vote_disagreement(p), [1 / 3], rtol=1e-6)


def test_temperature_sharpens_or_flattens_but_keeps_the_top_class() -> None:
    p = np.array([[[0.6, 0.3, 0.1], [0.4, 0.4, 0.2]]])
    mean = p.mean(axis=1)
    for t in (0.5, 2.0):
        expected = mean ** (1 / t) / (mean ** (1 / t)).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(scores.probabilities(p, t), expected, rtol=1e-6)
    assert scores.probabilities(p, 0.5)[0, 0] > mean[0, 0] > scores.probabilities(p, 2.0)[0, 0]
    # disagreement scores ignore the temperature
    a, b = scores.ensemble_scores(p, 1.0), scores.ensemble_scores(p, 3.0)
    np.testing.assert_array_equal(a.mutual_information, b.mutual_information)
    np.testing.assert_array_equal(a.top_class, b.top_class)


def test_temperature_with_a_zero_probability_class() -> None:
    p = np.array([[[1.0, 0.0], [1.0, 0.0]]])
    np.testing.assert_allclose(scores.probabilities(p, 2.0), [[1.0, 0.0]])


def test_softmax_is_stable_for_large_logits() -> None:
    out = scores.softmax(np.array([[1000.0, 1000.0, -1000.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.0]])
    assert out.dtype == np.float32


def test_dtypes_and_shapes() -> None:
    p = scores.softmax(np.random.default_rng(0).normal(size=(4, 3, 5)))
    s = scores.ensemble_scores(p)
    assert s.probabilities.shape == (4, 5) and s.probabilities.dtype == np.float32
    assert s.top_class.shape == (4,) and s.top_class.dtype == np.int64
    assert s.member_kl.shape == (4, 3) and s.member_kl.dtype == np.float32
    assert s.member_top_class.shape == (4, 3) and s.member_top_class.dtype == np.int64
    assert s.member_probabilities.shape == (4, 3, 5)
    assert len(s.rows(1, 3)) == 2


member_probs = arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(2, 6)),
                      elements=st.floats(-30, 30)).map(lambda logits: scores.softmax(logits))


@settings(max_examples=60, deadline=None)
@given(member_probs)
def test_identities(p: np.ndarray) -> None:
    s = scores.ensemble_scores(p)
    np.testing.assert_allclose(s.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all((s.vote_disagreement >= 0) & (s.vote_disagreement <= 1))
    assert np.all(s.mutual_information >= 0)
    # MI == mean_m KL(p_m || p_mean)
    np.testing.assert_allclose(s.mutual_information, s.member_kl.mean(axis=1), atol=1e-5)
    # H[p_mean] = E_m H[p_m] + MI
    np.testing.assert_allclose(s.predictive_entropy, s.expected_entropy + s.mutual_information,
                               atol=1e-5)
    assert np.all(np.isfinite(s.member_kl))


def test_the_table_drives_the_served_dataclass() -> None:
    """EnsembleScores has one field per row of SCORES, in order, each of the row's dtype and
    shape; the table's names and specs are its rows."""
    import dataclasses

    assert [f.name for f in dataclasses.fields(scores.EnsembleScores)] == list(scores.SCORE_NAMES)
    assert scores.SCORE_NAMES == tuple(spec.name for spec in scores.SCORES)
    assert all(scores.SCORE_SPECS[spec.name] is spec for spec in scores.SCORES)
    assert set(scores.FUSED_REQUIRED_SCORES) <= set(scores.SCORE_NAMES)
    p = scores.softmax(np.random.default_rng(0).normal(size=(4, 3, 5)))
    s = scores.ensemble_scores(p)
    for spec in scores.SCORES:
        value = getattr(s, spec.name)
        assert value.dtype == spec.dtype and value.shape == spec.shape(4, 3, 5), spec.name


def test_complete_scores_keeps_what_is_known_and_computes_the_rest() -> None:
    """What a fused graph outputs is kept as it is; what it predates comes from the members'
    probabilities, equal to the numpy score, and derived from the known scores it depends on."""
    p = scores.softmax(np.random.default_rng(1).normal(size=(3, 4, 6))).astype(np.float32)
    full = scores.ensemble_scores(p, 2.0)
    known = {name: getattr(full, name) for name in scores.FUSED_REQUIRED_SCORES}
    known["mutual_information"] = np.full(3, 7.0, dtype=np.float32)  # not recomputed
    done = scores.complete_scores(p, known, 2.0)
    assert done.probabilities is known["probabilities"]
    np.testing.assert_array_equal(done.mutual_information, 7.0)
    for name in scores.SCORE_NAMES:
        if name != "mutual_information":
            np.testing.assert_array_equal(getattr(done, name), getattr(full, name), err_msg=name)
