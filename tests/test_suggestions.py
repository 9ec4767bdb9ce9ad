"""fedcourse.suggestions: the simulated phones of lesson 10 are seeded, non-IID, unbalanced and
eligible mostly at night, as its docstring says."""

from __future__ import annotations

import numpy as np
import torch

from fedcourse import suggestions as s


def test_the_same_seed_gives_the_same_population_and_a_bigger_one_keeps_the_first_phones():
    a, b = s.make_population(20, 5, seed=3), s.make_population(20, 5, seed=3)
    assert [d.impressions for d in a.devices] == [d.impressions for d in b.devices]
    assert all(np.array_equal(x.states, y.states) for x, y in zip(a.devices, b.devices))
    bigger = s.make_population(40, 5, seed=3)
    assert [d.impressions for d in bigger.devices[:20]] == [d.impressions for d in a.devices]
    assert [d.impressions for d in bigger.held_out] == [d.impressions for d in a.held_out]
    other = s.make_population(20, 5, seed=4)
    assert [d.impressions for d in other.devices] != [d.impressions for d in a.devices]


def test_impressions_are_well_formed_in_time_order_and_within_the_history():
    population = s.make_population(30, 10, seed=0)
    ids = [d.device_id for d in population.devices + population.held_out]
    assert ids == list(range(40))
    for device in population.devices + population.held_out:
        times = [r["time"] for r in device.impressions]
        assert times == sorted(times) and 0 <= times[0] and times[-1] < s.NOW
        for record in device.impressions:
            assert set(record) == {"features", "clicked", "time"} and len(record["features"]) == s.NUM_FEATURES
            assert isinstance(record["clicked"], bool)
        assert device.states.shape == (24, 3) and device.states.dtype == bool


def test_the_data_are_unbalanced_and_non_iid():
    population = s.make_population(300, 10, seed=0)
    sizes = np.array([len(d.impressions) for d in population.devices])
    assert sizes.max() > 5 * np.median(sizes) and sizes.min() < np.median(sizes) / 3
    rates = np.array([np.mean([r["clicked"] for r in d.impressions]) for d in population.devices if len(d.impressions) >= 50])
    overall = np.mean([r["clicked"] for d in population.devices for r in d.impressions])
    assert 0.12 < overall < 0.24
    # far more spread in per-phone click rates than sampling alone gives (binomial: sqrt(p(1-p)/n) < 0.06)
    assert rates.std() > 0.08


def test_phones_are_eligible_at_night_and_rarely_in_the_day():
    population = s.make_population(400, 10, seed=0)
    eligible = np.array([d.states.all(axis=1) for d in population.devices]).mean(axis=0)
    assert eligible[[0, 1, 2, 3]].min() > 0.4
    assert eligible[10:17].max() < 0.05


def test_the_true_weights_separate_clicks_and_the_model_helpers_agree():
    population = s.make_population(100, 10, seed=0)
    features, labels = s.as_tensors([r for d in population.devices for r in d.impressions])
    assert features.shape == (len(labels), s.NUM_FEATURES) and features.dtype == torch.float32
    state = {"weight": torch.tensor(s.TRUE_WEIGHTS), "bias": torch.tensor([-2.3])}
    p = s.click_probability(state, features)
    assert p[labels == 1].mean() > p[labels == 0].mean() + 0.1
    zero = s.click_probability(s.initial_state(), features[:3])
    assert torch.allclose(zero, torch.full((3,), 0.5))
    empty_features, empty_labels = s.as_tensors([])
    assert empty_features.shape == (0, s.NUM_FEATURES) and empty_labels.shape == (0,)
