"""fedcourse.frameworks: lesson 11's adapters from the course's FedAvg to TFF and Flower.

The adapters that need neither framework (the replayed seeds and batch orders, the weight
conversion, the Flower client's training) are tested here in any environment. Those that need
TensorFlow Federated or Flower are skipped where they are absent (the main environment) and run
in lesson 11's own environment, `.venv-tff`: the last test runs this file there when it exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedcourse import frameworks
from fedcourse.fedavg import client_update, fedavg
from fedcourse.frameworks import Setting, epoch_orders, flat_arrays, keras_weights, largest_gap, round_seeds, torch_state
from fedcourse.models import LogisticRegression

REPO = Path(__file__).resolve().parent.parent
TFF_PYTHON = REPO / ".venv-tff" / "bin" / "python"


def _initial(seed: int = 0):
    torch.manual_seed(seed)
    return LogisticRegression().state_dict()


def test_settings_rebuild_the_same_clients_and_skewed_ones_are_unequal():
    setting = Setting(num_clients=5, examples=300, split="quantity_skew", seed=2)
    sizes = setting.sizes()
    assert sum(sizes) == 300 and len(set(sizes)) > 1
    again = Setting(num_clients=5, examples=300, split="quantity_skew", seed=2).clients()
    assert [list(c.indices) for c in again] == [list(c.indices) for c in setting.clients()]
    assert set(Setting(num_clients=4, examples=200).sizes()) == {50}
    with pytest.raises(ValueError, match="split"):
        Setting(split="shards").clients()


def test_epoch_orders_are_the_orders_client_update_trains_in():
    setting = Setting(num_clients=3, examples=90)
    client = setting.clients()[1]
    images, labels = flat_arrays(client)
    assert images.dtype == np.float32 and images.shape == (30, 784) and labels.dtype == np.int64
    model = LogisticRegression()
    by_hand = LogisticRegression()
    by_hand.load_state_dict(model.state_dict())
    for order in epoch_orders(len(labels), 3, seed=11):
        for start in range(0, len(labels), 8):
            index = order[start:start + 8]
            by_hand.zero_grad()
            F.nll_loss(by_hand(torch.from_numpy(images[index])), torch.from_numpy(labels[index])).backward()
            with torch.no_grad():
                for parameter in by_hand.parameters():
                    parameter -= 0.1 * parameter.grad
    trained = client_update(model, client, epochs=3, batch_size=8, lr=0.1, seed=11, device="cpu")
    for key, value in trained.items():
        assert torch.allclose(by_hand.state_dict()[key], value, atol=1e-6)


def test_round_seeds_replay_federated_averaging_so_a_hand_written_loop_matches_it_exactly():
    setting = Setting(num_clients=4, rounds=3, epochs=2, batch_size=16, lr=0.1, seed=7, split="quantity_skew",
                      examples=200)
    initial = _initial()
    model = LogisticRegression()
    model.load_state_dict(initial)
    by_hand = []
    for seeds in round_seeds(setting.num_clients, setting.rounds, setting.seed):
        states = [client_update(model, client, epochs=2, batch_size=16, lr=0.1, seed=seed, device="cpu")
                  for client, seed in zip(setting.clients(), seeds)]
        state = fedavg(states, setting.sizes())
        model.load_state_dict(state)
        by_hand.append(state)
    course = frameworks.course_states(setting, initial)
    assert len(course) == 3 and largest_gap(course, by_hand) == 0.0
    assert largest_gap(course[:1], [initial]) > 1e-3  # it trained


def test_keras_weights_are_the_transposed_torch_weights_and_convert_back():
    state = _initial(3)
    kernel, bias = keras_weights(state)
    assert kernel.shape == (784, 10) and kernel.dtype == np.float32 and bias.shape == (10,)
    x = np.random.default_rng(0).normal(size=(5, 784)).astype(np.float32)
    with torch.no_grad():
        expected = LogisticRegression().eval()
        expected.load_state_dict(state)
        logits = expected.linear(torch.from_numpy(x)).numpy()
    assert np.allclose(x @ kernel + bias, logits, atol=1e-5)
    back = torch_state([kernel, bias])
    assert all(torch.equal(back[key], state[key]) for key in state)
    with pytest.raises(ValueError, match="784, 10"):
        torch_state([kernel.T, bias])


def test_the_flower_client_trains_with_the_round_it_is_told_and_reports_its_size():
    setting = Setting(num_clients=3, rounds=2, epochs=1, batch_size=10, lr=0.1, seed=1, split="quantity_skew",
                      examples=120)
    initial = _initial()
    client = frameworks.CourseClient(setting, 2)
    arrays = [value.numpy().copy() for value in initial.values()]
    weights, count, metrics = client.fit(arrays, {"server_round": 2})
    model = LogisticRegression()
    model.load_state_dict(initial)
    expected = client_update(model, setting.clients()[2], epochs=1, batch_size=10, lr=0.1,
                             seed=setting.seeds()[1][2], device="cpu")
    assert count == setting.sizes()[2] and metrics == {}
    assert np.allclose(weights[0], expected["linear.weight"].numpy(), atol=1e-7)
    assert [a.shape for a in client.get_parameters({})] == [(10, 784), (10,)]


def test_largest_gap_and_what_tff_lacks_here():
    a = [{"w": torch.zeros(3)}]
    assert largest_gap(a, [{"w": torch.tensor([0.0, -0.5, 0.25])}]) == 0.5
    with pytest.raises(ValueError):
        largest_gap(a, a + a)
    reason = frameworks.tff_missing()
    try:
        import tensorflow_federated  # noqa: F401
    except ImportError:
        assert reason and "Python 3.11" in reason
        assert frameworks.tff_skip_reason() is None or "COLAB_RELEASE_TAG" in os.environ
    else:
        assert reason is None


# --- with the frameworks (lesson 11's environment) --------------------------------------------

def test_tff_client_data_holds_client_updates_batches_epoch_by_epoch():
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_federated")
    client = Setting(num_clients=4, examples=200).clients()[0]
    images, labels = flat_arrays(client)
    data = frameworks.tff_client_data(client, 2, 16, seed=3)
    assert isinstance(data, tf.data.Dataset)
    batches = [(x.numpy(), y.numpy()) for x, y in data]
    assert [len(y) for _, y in batches] == [16, 16, 16, 2] * 2
    orders = epoch_orders(50, 2, 3)
    assert np.array_equal(batches[4][1], labels[orders[1][:16].numpy()])
    assert [len(y) for _, y in frameworks.tff_client_data(client, 3, None, seed=0)] == [50] * 3


def test_tff_and_the_course_agree_on_weighted_fedavg():
    pytest.importorskip("tensorflow_federated")
    setting = Setting(num_clients=4, rounds=2, epochs=2, batch_size=16, lr=0.1, seed=3, split="quantity_skew",
                      examples=200)
    initial = _initial()
    model = frameworks.keras_model(initial)
    assert np.array_equal(model.get_weights()[0], initial["linear.weight"].numpy().T)
    try:
        states = frameworks.tff_fedavg(frameworks.build_tff_fedavg(setting.lr), setting, initial)
    finally:
        assert frameworks.stop_tff_workers() >= 1  # TFF started its worker_binary, and it is stopped
    assert largest_gap(states, frameworks.course_states(setting, initial)) < 1e-6


def test_flower_and_the_course_agree_on_weighted_fedavg():
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    setting = Setting(num_clients=5, rounds=2, epochs=1, batch_size=16, lr=0.1, seed=5, split="quantity_skew",
                      examples=250)
    initial = _initial()
    states = frameworks.flower_fedavg(setting, initial)
    assert largest_gap(states, frameworks.course_states(setting, initial)) < 1e-6


def test_ray_that_fails_to_start_is_tried_again_then_named_in_a_clear_error(monkeypatch):
    ray = pytest.importorskip("ray")
    calls = []

    def failing_init(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("Failed to start GCS.  Last 0 lines of error files:")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "init", failing_init)
    with pytest.raises(RuntimeError, match="did not start in 3 tries .*Failed to start GCS.*run the cell again"):
        frameworks.start_ray({"include_dashboard": False})
    assert len(calls) == 3 and calls[0]["include_dashboard"] is False

    calls.clear()

    def init_on_second_try(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise RuntimeError("Failed to start GCS.")

    monkeypatch.setattr(ray, "init", init_on_second_try)
    frameworks.start_ray({})
    assert len(calls) == 2


@pytest.mark.skipif(not TFF_PYTHON.exists(), reason="lesson 11's environment (.venv-tff) is not made: `make setup`")
def test_the_adapters_in_lesson_11s_environment():
    """This file again, in .venv-tff, where the framework tests above run instead of skipping."""
    if "tensorflow_federated" in sys.modules:
        pytest.skip("already running in lesson 11's environment")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(TFF_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", str(Path(__file__)),
                          "-k", "not in_lesson_11s_environment"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]
