"""fedcourse.fedavg: the FedAvg reference lessons 06, 08 and 09 build on.

Each test names the wrong implementation it rules out.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from fedcourse.fedavg import (
    History,
    RoundResult,
    client_update,
    fedavg,
    federated_averaging,
    run_round,
    sample_clients,
)
from fedcourse.models import LogisticRegression


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return set(a) == set(b) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _toy_clients(sizes=(40, 10, 25, 5, 60), seed=0):
    """Separable 2-class data in 784 dimensions, split into clients of the given sizes."""
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    labels = torch.randint(0, 2, (n,), generator=generator)
    images = torch.randn(n, 1, 28, 28, generator=generator) * 0.5
    images[:, 0, 0, :10] += (2 * labels - 1).float().unsqueeze(1) * 2
    data = TensorDataset(images, labels)
    bounds = torch.cumsum(torch.tensor((0,) + tuple(sizes)), 0).tolist()
    return data, [Subset(data, list(range(a, b))) for a, b in zip(bounds[:-1], bounds[1:])]


# --- fedavg -----------------------------------------------------------------------------------


def test_fedavg_weights_by_examples_not_a_plain_mean():
    states = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([4.0, 8.0])}]
    result = fedavg(states, [1, 3])
    assert torch.allclose(result["w"], torch.tensor([3.0, 6.0]))  # the plain mean would be [2, 4]
    assert torch.allclose(fedavg(states, torch.tensor([10, 30]))["w"], torch.tensor([3.0, 6.0]))
    assert torch.allclose(fedavg(states, [1, 0])["w"], torch.zeros(2)), "a zero weight must not count"


def test_fedavg_of_model_states_matches_the_formula_and_keeps_inputs():
    torch.manual_seed(0)
    states = [LogisticRegression().state_dict() for _ in range(3)]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    sizes = [100, 300, 600]
    result = fedavg(states, sizes)
    for key in before[0]:
        expected = sum(n * s[key] for n, s in zip(sizes, before)) / sum(sizes)
        assert torch.allclose(result[key], expected, atol=1e-6)
        assert result[key].dtype == torch.float32
        assert all(result[key] is not s[key] for s in states), "return new tensors"
    assert all(_same_state(b, s) for b, s in zip(before, states)), "fedavg must not modify its inputs"


def test_fedavg_keeps_integer_buffers_integer():
    bn_states = []
    for steps in (3, 5):
        bn = nn.BatchNorm1d(4)
        for _ in range(steps):
            bn(torch.randn(8, 4))
        bn_states.append(bn.state_dict())
    result = fedavg(bn_states, [1, 1])
    counter = result["num_batches_tracked"]
    assert counter.dtype == torch.int64, "an integer buffer must not be averaged into a float"
    assert counter.item() == 5, "the counter takes the largest count"
    expected_mean = (bn_states[0]["running_mean"] + bn_states[1]["running_mean"]) / 2
    assert torch.allclose(result["running_mean"], expected_mean), "float buffers are averaged like parameters"
    nn.BatchNorm1d(4).load_state_dict(result)  # loads without dtype trouble


def test_fedavg_keeps_float64_entries_in_float64():
    result = fedavg([{"w": torch.ones(2, dtype=torch.float64)}] * 2, [1, 2])
    assert result["w"].dtype == torch.float64


@pytest.mark.parametrize("states, weights, fragment", [
    ([], [], "nothing to average"),
    ([{"w": torch.ones(1)}], [1, 2], "1 states but 2 weights"),
    ([{"w": torch.ones(1)}] * 2, [0, 0], "sum to zero"),
    ([{"w": torch.ones(1)}] * 2, [3, -1], "non-negative"),
    ([{"w": torch.ones(1)}] * 2, [1, float("nan")], "finite"),
    ([{"w": torch.ones(1)}, {"v": torch.ones(1)}], [1, 1], "different keys"),
    ([{"w": torch.ones(1)}, {"w": torch.ones(3)}], [1, 1], "different shapes"),
])
def test_fedavg_rejects_bad_input(states, weights, fragment):
    with pytest.raises(ValueError, match=fragment):
        fedavg(states, weights)


# --- client_update ------------------------------------------------------------------------------


def test_client_update_trains_a_copy_and_returns_cpu_tensors():
    _, clients = _toy_clients()
    torch.manual_seed(0)
    model = LogisticRegression()
    before = _snapshot(model)
    state = client_update(model, clients[0], epochs=2, batch_size=10, lr=0.1, seed=1, device="cpu")
    assert _same_state(before, model.state_dict()), "client_update must not mutate the global model"
    assert not torch.equal(state["linear.weight"], before["linear.weight"]), "the returned weights must be trained"
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    assert state["linear.weight"].data_ptr() != model.linear.weight.data_ptr()


def test_client_update_is_seeded_and_epochs_and_batches_matter():
    _, clients = _toy_clients()
    torch.manual_seed(0)
    model = LogisticRegression()
    run = lambda **kw: client_update(model, clients[0], lr=0.1, device="cpu", **kw)  # noqa: E731
    a = run(epochs=1, batch_size=10, seed=3)
    assert _same_state(a, run(epochs=1, batch_size=10, seed=3)), "same seed, same result"
    assert not _same_state(a, run(epochs=1, batch_size=10, seed=4)), "the seed shuffles the data"
    assert not _same_state(a, run(epochs=2, batch_size=10, seed=3)), "epochs must be used"
    assert not _same_state(a, run(epochs=1, batch_size=20, seed=3)), "batch_size must be used"
    assert _same_state(model.state_dict(), run(epochs=0, batch_size=10, seed=3)), "zero epochs change nothing"


def test_client_update_with_all_data_in_one_batch_is_one_gradient_step():
    data, clients = _toy_clients()
    torch.manual_seed(0)
    model = LogisticRegression()
    inputs, labels = data.tensors[0][:40], data.tensors[1][:40]
    reference = copy.deepcopy(model)
    torch.nn.functional.nll_loss(reference(inputs), labels).backward()
    expected = {name: p.detach() - 0.5 * p.grad for name, p in reference.named_parameters()}
    state = client_update(model, clients[0], epochs=1, batch_size=None, lr=0.5, seed=0, device="cpu")
    for name, value in expected.items():
        assert torch.allclose(state[name], value, atol=1e-6), "FedSGD: E=1, B=all is one full-batch step"


def _full_batch_steps(model, inputs, labels, steps, lr, mu=0.0, weight_decay=0.0):
    """The test's own gradient descent on NLL + mu/2 ||w - w_start||^2 + weight_decay/2 ||w||^2."""
    model = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        model.zero_grad()
        torch.nn.functional.nll_loss(model(inputs), labels).backward()
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), start):
                p -= lr * (p.grad + mu * (p - p0) + weight_decay * p)
    return {name: p.detach() for name, p in model.named_parameters()}


def test_client_update_with_mu_adds_fedprox_proximal_term():
    data, clients = _toy_clients()
    torch.manual_seed(0)
    model = LogisticRegression()
    inputs, labels = data.tensors[0][:40], data.tensors[1][:40]
    run = lambda **kw: client_update(model, clients[0], epochs=3, batch_size=None, lr=0.5, seed=0,  # noqa: E731
                                     device="cpu", **kw)
    assert _same_state(run(), run(mu=0.0)), "mu=0 is plain FedAvg"
    prox = run(mu=0.7)
    for name, value in _full_batch_steps(model, inputs, labels, 3, 0.5, mu=0.7).items():
        assert torch.allclose(prox[name], value, atol=1e-6), "the proximal term pulls towards the global model"
    plain = run()
    drift = lambda state: sum((state[k] - model.state_dict()[k]).norm() ** 2 for k in state)  # noqa: E731
    assert drift(prox) < drift(plain), "FedProx's clients stay closer to the global model"
    decayed = run(weight_decay=0.3)
    for name, value in _full_batch_steps(model, inputs, labels, 3, 0.5, weight_decay=0.3).items():
        assert torch.allclose(decayed[name], value, atol=1e-6), "weight_decay is SGD's L2 penalty"
    with pytest.raises(ValueError, match="non-negative"):
        run(mu=-1.0)


def test_run_round_and_federated_averaging_pass_mu_to_the_clients():
    data, clients = _toy_clients()
    torch.manual_seed(0)
    model = LogisticRegression()
    round_with = lambda mu: run_round(model, clients, fraction=1.0, epochs=2, batch_size=None, lr=0.5,  # noqa: E731
                                      generator=torch.Generator().manual_seed(0), device="cpu", mu=mu)
    expected = fedavg([client_update(model, c, epochs=2, batch_size=None, lr=0.5, device="cpu", mu=2.0)
                       for c in clients], [len(c) for c in clients])
    assert _same_state(round_with(0.0).state, run_round(model, clients, fraction=1.0, epochs=2, batch_size=None,
                                                         lr=0.5, generator=torch.Generator().manual_seed(0),
                                                         device="cpu").state)
    for name, value in expected.items():
        assert torch.allclose(round_with(2.0).state[name], value, atol=1e-6)
    runs = {}
    for mu in (0.0, 2.0):
        trained = copy.deepcopy(model)
        federated_averaging(trained, clients, data, rounds=2, epochs=2, batch_size=None, lr=0.5, device="cpu",
                            progress=False, mu=mu)
        runs[mu] = trained.state_dict()
    assert not _same_state(runs[0.0], runs[2.0]), "federated_averaging must hand mu to its rounds"


# --- sample_clients -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_clients, fraction, count", [
    (100, 0.1, 10), (10, 0.1, 1), (10, 0.01, 1), (7, 1.0, 7), (20, 0.33, 7), (50, 0.5, 25)])
def test_sample_clients_draws_max_round_cK_1_distinct_sorted(num_clients, fraction, count):
    chosen = sample_clients(num_clients, fraction, torch.Generator().manual_seed(0))
    assert len(chosen) == count
    assert chosen == sorted(set(chosen)) and all(0 <= k < num_clients for k in chosen)
    assert all(type(k) is int for k in chosen)


def test_sample_clients_follows_the_generator():
    draw = lambda seed: sample_clients(100, 0.1, torch.Generator().manual_seed(seed))  # noqa: E731
    assert draw(0) == draw(0)
    assert len({tuple(draw(seed)) for seed in range(10)}) >= 9, "different seeds must give different samples"
    generator = torch.Generator().manual_seed(0)
    rounds = [tuple(sample_clients(100, 0.1, generator)) for _ in range(5)]
    assert len(set(rounds)) == 5, "successive rounds must draw fresh samples from the same generator"
    covered = set().union(*[set(sample_clients(10, 0.3, generator)) for _ in range(50)])
    assert covered == set(range(10)), "every client must be sampled sometimes"


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_sample_clients_rejects_impossible_fractions(fraction):
    with pytest.raises(ValueError, match="fraction"):
        sample_clients(10, fraction, torch.Generator())


# --- run_round ------------------------------------------------------------------------------------


def _recording_fedavg(log):
    def aggregate(states, weights):
        log.append((list(states), list(weights)))
        return fedavg(states, weights)
    return aggregate


def test_run_round_averages_reporting_clients_weighted_by_size_without_mutating():
    _, clients = _toy_clients()
    torch.manual_seed(0)
    model = LogisticRegression()
    before = _snapshot(model)
    log = []
    result = run_round(model, clients, fraction=1.0, epochs=1, batch_size=10, lr=0.1,
                       generator=torch.Generator().manual_seed(0), device="cpu", aggregate=_recording_fedavg(log))
    assert isinstance(result, RoundResult)
    assert _same_state(before, model.state_dict()), "run_round must not mutate the global model"
    assert result.sampled == result.reported == [0, 1, 2, 3, 4]
    (states, weights), = log
    assert weights == [40, 10, 25, 5, 60], "weights are the clients' numbers of examples"
    assert _same_state(result.state, fedavg(states, weights))


def test_run_round_drops_clients_and_counts_only_those_that_reported():
    _, clients = _toy_clients()
    torch.manual_seed(0)
    model = LogisticRegression()
    sizes = [len(c) for c in clients]
    seen_partial = False
    for seed in range(20):
        log = []
        result = run_round(model, clients, fraction=1.0, epochs=1, batch_size=10, lr=0.1, dropout=0.5,
                           generator=torch.Generator().manual_seed(seed), device="cpu",
                           aggregate=_recording_fedavg(log))
        assert set(result.reported) <= set(result.sampled)
        if result.reported:
            (states, weights), = log
            assert len(states) == len(result.reported), "only clients that reported are averaged"
            assert weights == [sizes[k] for k in result.reported]
        seen_partial |= 0 < len(result.reported) < len(result.sampled)
    assert seen_partial, "with dropout 0.5 some rounds must lose some clients"


def test_run_round_dropout_rate_is_respected():
    _, clients = _toy_clients(sizes=(2,) * 50)
    model = LogisticRegression()
    generator = torch.Generator().manual_seed(0)
    reported = sum(len(run_round(model, clients, fraction=1.0, epochs=0, batch_size=2, lr=0.1, dropout=0.3,
                                 generator=generator, device="cpu").reported) for _ in range(10))
    assert 0.6 * 500 < reported < 0.8 * 500


def test_a_round_nobody_reports_leaves_the_model_unchanged_and_says_so():
    _, clients = _toy_clients()
    model = LogisticRegression()
    before = _snapshot(model)
    called = []
    result = run_round(model, clients, fraction=0.4, epochs=1, batch_size=10, lr=0.1, dropout=1.0,
                       generator=torch.Generator().manual_seed(0), device="cpu",
                       aggregate=lambda s, w: called.append(1), round_number=7)
    assert result.reported == [] and len(result.sampled) == 2
    assert not called, "with nobody reporting there is nothing to aggregate"
    assert _same_state(result.state, before)
    assert result.message.startswith("round 7: ") and "unchanged" in result.message
    assert "no client reported" in result.message


def test_run_round_samples_with_the_generator_and_fraction():
    _, clients = _toy_clients(sizes=(3,) * 20)
    model = LogisticRegression()
    draw = lambda seed, fraction: run_round(  # noqa: E731
        model, clients, fraction=fraction, epochs=0, batch_size=3, lr=0.1,
        generator=torch.Generator().manual_seed(seed), device="cpu").sampled
    assert len(draw(0, 0.25)) == 5 and len(draw(0, 0.05)) == 1
    assert draw(1, 0.25) == draw(1, 0.25)
    assert len({tuple(draw(seed, 0.25)) for seed in range(6)}) >= 5


# --- federated_averaging --------------------------------------------------------------------------


def test_federated_averaging_learns_trains_in_place_and_stops_at_target():
    data, clients = _toy_clients()
    torch.manual_seed(0)
    model = LogisticRegression()
    before = _snapshot(model)
    history = federated_averaging(model, clients, data, rounds=30, fraction=0.6, epochs=2, batch_size=10,
                                  lr=0.1, seed=0, target_accuracy=0.95, device="cpu", progress=False)
    assert isinstance(history, History)
    assert history.rounds_to_target is not None and history.rounds[-1] == history.rounds_to_target < 30
    assert history.accuracy[-1] >= 0.95
    assert not _same_state(before, model.state_dict()), "the caller's model is the global model, trained in place"
    assert len(history.reported) == history.rounds_to_target == len(history.messages)


def test_federated_averaging_repeats_with_a_seed_and_evaluates_every_k_rounds():
    data, clients = _toy_clients()

    def run(seed):
        torch.manual_seed(0)
        model = LogisticRegression()
        return federated_averaging(model, clients, data, rounds=7, fraction=0.4, epochs=1, batch_size=5, lr=0.05,
                                   dropout=0.3, seed=seed, eval_every=3, device="cpu", progress=False)

    a, b = run(0), run(0)
    assert a.rounds == [3, 6, 7] and a.rounds_to_target is None
    assert a.accuracy == b.accuracy and a.loss == b.loss and a.reported == b.reported
    assert a.loss != run(1).loss


def test_federated_averaging_uses_the_aggregate_hook():
    data, clients = _toy_clients()
    calls = []

    def aggregate(states, weights):
        calls.append(sum(weights))
        return fedavg(states, weights)

    federated_averaging(LogisticRegression(), clients, data, rounds=3, seed=0, device="cpu",
                        aggregate=aggregate, progress=False)
    assert calls == [140, 140, 140]
