"""fedcourse.fl_system: the reference parts of lesson 10's private federated system."""

from __future__ import annotations

import math
import pickle
import random
import sqlite3

import numpy as np
import pytest
import torch

from fedcourse import fl_system as fl
from fedcourse.privacy import clip_update, compute_epsilon
from fedcourse.secagg import ProtocolAborted
from fedcourse.suggestions import Device, NOW, initial_state, make_population


def record(i: float, clicked: bool = False) -> dict:
    return {"features": [float(i), 0.0, 1.0, 0.0, 1.0], "clicked": clicked, "time": float(i)}


def rows(path) -> int:
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT COUNT(*) FROM impressions").fetchone()[0]


# --- the cache ---------------------------------------------------------------------------------


def test_cache_round_trip_persists_in_the_file(tmp_path):
    path = tmp_path / "a.sqlite"
    cache = fl.TrainingCache(path, ttl=100.0, capacity=50)
    cache.log([record(i, i % 2 == 0) for i in range(5)])
    features, labels = cache.examples(10.0)
    assert features.shape == (5, 5) and labels.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    cache.close()
    again = fl.TrainingCache(path, ttl=100.0, capacity=50)
    assert len(again) == 5 and again.examples(10.0)[0][:, 0].tolist() == [0, 1, 2, 3, 4]


def test_cache_expires_deletes_and_caps(tmp_path):
    path = tmp_path / "b.sqlite"
    cache = fl.TrainingCache(path, ttl=10.0, capacity=1000)
    cache.log([record(i + 0.5) for i in range(30)])
    assert cache.examples(30.0)[0][:, 0].tolist() == [20.5 + i for i in range(10)]
    assert rows(path) == 10
    capped = fl.TrainingCache(tmp_path / "c.sqlite", ttl=1000.0, capacity=4)
    capped.log([record(i) for i in range(10)])
    capped.log([record(i) for i in range(10, 12)])
    assert rows(tmp_path / "c.sqlite") == 4
    assert capped.examples(20.0)[0][:, 0].tolist() == [8, 9, 10, 11]


@pytest.mark.parametrize("bad", [
    {"features": [0.0] * 4, "clicked": True, "time": 1.0},
    {"features": [float("nan")] + [0.0] * 4, "clicked": True, "time": 1.0},
    {"features": [0.0] * 5, "clicked": 2, "time": 1.0},
    {"features": [0.0] * 5, "clicked": True},
    {"features": [0.0] * 5, "clicked": True, "time": "now"},
    {"features": [0.0] * 5, "clicked": True, "time": 1.0, "extra": 1},
    "not a dict",
])
def test_a_bad_record_rolls_the_whole_batch_back(tmp_path, bad):
    path = tmp_path / "d.sqlite"
    cache = fl.TrainingCache(path, ttl=100.0, capacity=100)
    cache.log([record(0)])
    with pytest.raises(ValueError):
        cache.log([record(1), record(2), bad])
    assert rows(path) == 1
    cache.log([record(3)])
    assert rows(path) == 2


# --- eligibility and selection -------------------------------------------------------------------


def test_only_phones_charging_idle_and_unmetered_check_in():
    devices = []
    for i in range(8):
        states = np.zeros((24, 3), dtype=bool)
        states[2] = [bool(i & 1), bool(i & 2), bool(i & 4)]
        devices.append(Device(i, [], states))
    assert fl.eligible_devices(devices, 2) == [7]
    assert fl.eligible_devices(devices, 3) == []


def test_selection_is_poisson_sampling():
    counts = [len(fl.select_devices(list(range(500)), 0.2, torch.Generator().manual_seed(s))) for s in range(300)]
    assert abs(np.mean(counts) - 100) < 3 and 55 < np.var(counts) < 110  # 500 * 0.2 * 0.8 = 80
    with pytest.raises(ValueError):
        fl.select_devices([1, 2], 0.0, torch.Generator())


def test_a_round_closes_at_the_target_or_the_deadline_and_abandons_below_the_minimum():
    arrivals = {1: 3.0, 2: 1.0, 3: math.inf, 4: 12.0, 5: 2.0, 6: 5.0}
    assert fl.close_round(arrivals, 3, 10.0, 2) == [2, 5, 1]
    assert fl.close_round(arrivals, 10, 10.0, 2) == [2, 5, 1, 6]
    assert fl.close_round(arrivals, 10, 2.5, 3) == []


# --- plan and checkpoint -------------------------------------------------------------------------


def test_plan_rate_is_over_selection_times_target_over_expected_check_ins():
    plan = fl.make_plan(target=20, over_selection=1.3, expected_check_ins=100.0)
    assert plan["selection_rate"] == pytest.approx(0.26)
    assert fl.plan_from_bytes(fl.plan_to_bytes(plan)) == plan
    assert fl.make_plan(target=100, expected_check_ins=50.0)["selection_rate"] == 1.0


def test_checkpoint_round_trip_is_exact_compact_and_refuses_pickle(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(2, generator=g), "s": torch.randn((), generator=g)}
    data = fl.encode_checkpoint(state)
    assert len(data) <= 4 * 15 + 100
    back = fl.decode_checkpoint(data)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    witness = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os
            return (os.mkdir, (str(witness),))

    for bad in (pickle.dumps({"a": Payload()}), data[:-1], data + b"x", b"", b"FCKP"):
        with pytest.raises(ValueError):
            fl.decode_checkpoint(bad)
    assert not witness.exists()


def test_training_on_the_device_is_gradient_descent_on_the_cross_entropy():
    g = torch.Generator().manual_seed(1)
    features, labels = torch.randn(50, 5, generator=g), (torch.rand(50, generator=g) < 0.4).float()
    state = initial_state()
    plan = fl.make_plan(local_steps=3, learning_rate=0.7)
    weight = torch.zeros(5, requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight, bias], lr=0.7)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(features @ weight + bias, labels).backward()
        optimizer.step()
    update = fl.train_on_device(plan, state, features, labels)
    assert torch.allclose(update["weight"], weight.detach(), atol=1e-6)
    assert torch.allclose(update["bias"], bias.detach(), atol=1e-6)
    empty = fl.train_on_device(plan, state, torch.zeros(0, 5), torch.zeros(0))
    assert torch.equal(empty["weight"], torch.zeros(5))


# --- the private round and its accountant --------------------------------------------------------


def test_a_report_is_the_clipped_update_plus_a_noise_share_scaled_to_2C():
    plan = fl.make_plan(clip=0.5, noise_multiplier=1.2, min_reports=9)
    report = fl.device_report(torch.zeros(100_000), plan, torch.Generator().manual_seed(0))
    assert report.std().item() == pytest.approx(1.2 * 1.0 / 3, rel=0.02)
    quiet = dict(plan, noise_multiplier=0.0)
    assert torch.allclose(fl.device_report(torch.tensor([3.0, 4.0]), quiet, torch.Generator()),
                          torch.tensor([0.3, 0.4], dtype=torch.float64))
    assert fl.encoding_bound(plan) == pytest.approx(0.5 + 8 * 1.2 / 3)


def test_a_private_round_without_noise_is_the_clipped_sum_over_the_target_and_survives_dropouts():
    g = torch.Generator().manual_seed(2)
    state = {"weight": torch.randn(5, generator=g), "bias": torch.randn(1, generator=g)}
    updates = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(6)]
    plan = fl.make_plan(clip=0.8, noise_multiplier=0.0, target=8, min_reports=4)
    new, result = fl.private_round(state, updates, plan, torch.Generator(), random.Random(0), {5: "masked_input"})
    expected = fl.flatten_update(state) + sum(clip_update({"u": u}, 0.8)["u"] for u in updates[:5]) / 8
    assert result.survivors == [0, 1, 2, 3, 4]
    assert torch.allclose(fl.flatten_update(new), expected, atol=1e-4)


def test_the_noise_in_the_secure_sum_has_the_planned_variance():
    plan = fl.make_plan(clip=0.5, noise_multiplier=1.0, min_reports=4, target=10)
    totals = []
    for seed in range(40):
        _, result = fl.private_round(initial_state(), [torch.zeros(6, dtype=torch.float64)] * 4, plan,
                                     torch.Generator().manual_seed(seed), random.Random(seed))
        totals.append(result.total)
    # four shares of variance (z 2C)^2 / m_min = 1 / 4: the sum has variance 1, sigma^2 exactly (m = m_min)
    assert np.std(np.concatenate(totals)) == pytest.approx(1.0, rel=0.15)


def test_a_private_round_never_unmasks_a_sum_of_fewer_than_min_reports():
    plan = fl.make_plan(clip=0.5, noise_multiplier=1.0, min_reports=15, target=25)
    updates = [torch.full((6,), 0.01 * i, dtype=torch.float64) for i in range(25)]
    # 12 of 25 drop after sending their keys: 13 survive, a majority, but fewer than m_min = 15
    with pytest.raises(ProtocolAborted):
        fl.private_round(initial_state(), updates, plan, torch.Generator().manual_seed(0), random.Random(0),
                         {i: "masked_input" for i in range(12)})
    _, result = fl.private_round(initial_state(), updates, plan, torch.Generator().manual_seed(0), random.Random(0),
                                 {i: "masked_input" for i in range(10)})
    assert result.survivors == list(range(10, 25))


def test_the_driver_abandons_a_round_whose_secure_aggregation_aborts(tmp_path):
    population = make_population(60, 5, seed=0)
    plan = fl.make_plan(target=8, min_reports=4, expected_check_ins=28.0)
    caches = fl.build_caches(population, tmp_path, plan)

    calls = []

    def aborting(*args, **kwargs):
        calls.append(1)
        raise ProtocolAborted("too few survivors")

    run = fl.simulate(population, caches, plan, 4, private=True, seed=0, parts=fl.Parts(private_round=aborting))
    assert calls  # rounds closed with enough reports, then secure aggregation aborted
    assert all(r.abandoned and r.reports == 0 and not r.accepted for r in run.rounds)
    assert all(torch.equal(s[k], initial_state()[k]) for s in run.states for k in s)


def test_round_epsilons_compose_the_subsampled_gaussian_at_the_plans_rate():
    plan = fl.make_plan()
    epsilons = fl.round_epsilons(plan, 10, 1e-4)
    assert epsilons[-1] == pytest.approx(compute_epsilon(plan["selection_rate"], plan["noise_multiplier"], 10, 1e-4))
    assert all(a < b for a, b in zip(epsilons, epsilons[1:]))
    wrong = compute_epsilon(plan["target"] / 400, plan["noise_multiplier"], 10, 1e-4)
    assert wrong < 0.6 * epsilons[-1]  # K / population would understate the budget badly


# --- evaluation and the whole system -------------------------------------------------------------


def test_evaluation_counts_on_the_held_out_phones():
    population = make_population(10, 8, seed=1)
    state = {"weight": torch.tensor([1.0, 1.0, -1.0, 0.0, 0.0]), "bias": torch.tensor([-2.0])}
    result = fl.federated_evaluation(state, population, 0.0)
    clicks = [r["clicked"] for d in population.held_out for r in d.impressions]
    assert result["baseline_ctr"] == pytest.approx(np.mean(clicks)) == pytest.approx(result["model_ctr"])
    assert result["clicks_kept"] == 1.0 and result["shown_fraction"] == 1.0
    assert fl.federated_evaluation(state, population, 2.0)["model_ctr"] == 0.0


def test_round_times_run_through_the_night():
    times = fl.round_times(17)
    assert times[0] == (22, NOW) and times[1] == (22, NOW + 0.5) and times[4] == (0, NOW + 2.0)
    assert times[15] == (5, NOW + 7.5) and times[16] == (22, NOW + 24.0)


def test_the_private_system_learns_a_better_triggering_model(tmp_path):
    population = make_population(150, 40, seed=0)
    plan = fl.make_plan(target=12, min_reports=8, expected_check_ins=70.0)
    caches = fl.build_caches(population, tmp_path, plan)
    run = fl.simulate(population, caches, plan, 16, private=True, seed=0)
    closed = [r for r in run.rounds if not r.abandoned]
    assert len(run.states) == 16 and len(closed) >= 10
    assert all(plan["min_reports"] <= r.reports <= plan["target"] for r in closed)
    assert all(len(r.bytes_sent) == r.reports for r in closed)
    result = fl.federated_evaluation(run.states[-1], population, 0.15)
    assert result["model_ctr"] > 1.4 * result["baseline_ctr"] and result["clicks_kept"] > 0.5
