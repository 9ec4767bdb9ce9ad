"""Federated Averaging (McMahan et al. 2017), the reference that lessons 06, 08 and 09 build on.

Lesson 03 has students write these pieces; later lessons import them and replace only the
aggregation step (``aggregate=``) with an encrypted, noised or remote one.

One round of FedAvg: the server samples ``max(round(C * K), 1)`` of its K clients, each sampled
client that does not drop out trains a copy of the global model for E epochs with batch size B
on its own data (``client_update``) and sends back its weights, and the server replaces the
global model with their average weighted by the clients' numbers of examples (``fedavg``).
FedSGD is the special case E = 1, B = all of a client's data (``batch_size=None``).
FedProx (Li et al. 2020) is FedAvg whose clients add a proximal term (mu/2)||w - w_t||^2 to
their loss (``mu > 0``), which keeps local training near the global model w_t.

Everything random is drawn from one ``torch.Generator`` that the caller seeds, so a run repeats
exactly: which clients are asked, which drop out, and how each shuffles its data.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from fedcourse.checks import toolbox
from fedcourse.training import evaluate, get_device

__all__ = [
    "client_update",
    "epoch_orders",
    "fedavg",
    "sample_clients",
    "RoundResult",
    "run_round",
    "History",
    "federated_averaging",
]

State = dict[str, torch.Tensor]
Aggregator = Callable[[Sequence[Mapping[str, torch.Tensor]], Sequence[float]], State]

_SEED_RANGE = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# ClientUpdate
# ---------------------------------------------------------------------------------------------


def _dataset_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All (inputs, labels) of a data set as two tensors.

    Client data sets are small, and indexing two tensors per batch is many times faster than a
    DataLoader that fetches and collates one example at a time. Subsets of TensorDatasets (what
    ``fedcourse.partition.to_subsets`` returns) are sliced without touching examples one by one.
    """
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) != 2:
            raise ValueError(f"expected a data set of (input, label) pairs, got {len(dataset.tensors)} tensors")
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset):
        inputs, labels = _dataset_tensors(dataset.dataset)
        index = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return inputs[index], labels[index]
    pairs = [dataset[i] for i in range(len(dataset))]
    if not pairs:
        raise ValueError("cannot train on an empty data set")
    return torch.stack([torch.as_tensor(x) for x, _ in pairs]), torch.as_tensor([int(y) for _, y in pairs])


@toolbox
def epoch_orders(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The order in which ``client_update(..., seed=seed)`` visits a client's ``n`` examples in
    each of its ``epochs`` epochs: one ``torch.randperm`` per epoch from one seeded generator.
    Frameworks that must reproduce ``client_update`` batch for batch (lesson 11) use it too."""
    generator = torch.Generator().manual_seed(int(seed))
    return [torch.randperm(int(n), generator=generator) for _ in range(int(epochs))]


def client_update(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    batch_size: int | None,
    lr: float,
    momentum: float = 0.0,
    seed: int | None = None,
    device: torch.device | str | None = None,
    mu: float = 0.0,
    weight_decay: float = 0.0,
) -> State:
    """Train a copy of ``model`` on ``dataset`` (E epochs, batch size B; ``batch_size=None``
    means the whole data set in one batch) and return its new state_dict (CPU tensors,
    detached). Never mutates ``model``.

    Plain SGD on the NLL loss (the course's models return log-probabilities). The order of the
    examples in each epoch is drawn from a generator seeded with ``seed``; ``seed=None`` draws
    that seed from torch's global generator (so ``set_seed`` still makes a run repeat).
    With ``epochs=1, batch_size=None`` this is one full-batch gradient step: FedSGD's client.

    ``mu > 0`` is FedProx's client: every batch's loss gets the proximal term
    ``mu / 2 * ||w - w_start||^2`` over the parameters, with ``w_start`` the parameters of
    ``model`` (the global model) held fixed. ``weight_decay`` is SGD's L2 penalty
    ``weight_decay / 2 * ||w||^2``, for experiments that need an objective with a unique minimiser.
    """
    if int(epochs) != epochs or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None (all the data), got {batch_size!r}")
    if not mu >= 0 or not weight_decay >= 0:
        raise ValueError(f"mu and weight_decay must be non-negative, got mu={mu!r}, weight_decay={weight_decay!r}")
    inputs, labels = _dataset_tensors(dataset)
    n = len(labels)
    if n == 0:
        raise ValueError("cannot train on an empty data set")
    batch = n if batch_size is None else min(int(batch_size), n)
    if seed is None:
        seed = int(torch.randint(_SEED_RANGE, (1,)).item())
    orders = epoch_orders(n, int(epochs), int(seed))

    device = get_device() if device is None else torch.device(device)
    # Deep-copy first: moving or training the caller's model would change the global model.
    local = copy.deepcopy(model).to(device)
    local.train()
    inputs, labels = inputs.to(device), labels.to(device)
    parameters = [parameter for parameter in local.parameters() if parameter.requires_grad]
    anchor = [parameter.detach().clone() for parameter in parameters] if mu else []
    velocity: list[torch.Tensor | None] = [None] * len(parameters)
    for order in orders:
        order = order.to(device)
        for start in range(0, n, batch):
            index = order[start:start + batch]
            for parameter in parameters:
                parameter.grad = None
            F.nll_loss(local(inputs[index]), labels[index]).backward()
            # torch.optim.SGD's step (no dampening, no Nesterov), written out: for models this
            # small its bookkeeping costs more than the arithmetic.
            with torch.no_grad():
                for i, parameter in enumerate(parameters):
                    step = parameter.grad
                    if step is None:
                        continue
                    if mu:  # the proximal term's gradient, mu * (w - w_start)
                        step = step.add(parameter - anchor[i], alpha=mu)
                    if weight_decay:
                        step = step.add(parameter, alpha=weight_decay)
                    if momentum:
                        if velocity[i] is None:
                            velocity[i] = step.clone()
                        else:
                            velocity[i].mul_(momentum).add_(step)
                        step = velocity[i]
                    parameter.add_(step, alpha=-lr)
    return {key: value.detach().to("cpu", copy=True) for key, value in local.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The server's average
# ---------------------------------------------------------------------------------------------


def _shares(weights, count: int) -> list[float]:
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != count:
        raise ValueError(f"got {count} states but {w.numel()} weights: give one weight (number of examples) per state")
    if not torch.all(torch.isfinite(w)) or torch.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    total = w.sum()
    if total == 0:
        raise ValueError("the weights sum to zero, so the weighted average is undefined")
    return (w / total).tolist()


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights) -> State:
    """Weighted average of state_dicts (weights = numbers of examples).

    Floating-point entries are averaged (computed in float64, returned in their own dtype);
    integer and boolean buffers (e.g. BatchNorm's ``num_batches_tracked``) are not averaged
    into floats: the result takes their maximum and keeps the dtype. Inputs are not modified;
    every entry of the result is a new tensor. ValueError on empty input, mismatched keys or
    shapes, or weights that are negative, not finite or sum to zero.
    """
    states = list(states)
    if not states:
        raise ValueError("nothing to average: no client states were given")
    shares = _shares(weights, len(states))
    keys = list(states[0].keys())
    for k, state in enumerate(states[1:], start=1):
        if set(state.keys()) != set(keys):
            differ = sorted(set(state.keys()) ^ set(keys))
            raise ValueError(f"state {k} has different keys from state 0 (differing: {differ})")
    result: State = {}
    for key in keys:
        tensors = [torch.as_tensor(state[key]) for state in states]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"entry {key!r} has different shapes across states: {sorted(shapes)}")
        dtype = tensors[0].dtype
        if dtype.is_floating_point or dtype.is_complex:
            total = torch.zeros_like(tensors[0], dtype=torch.complex128 if dtype.is_complex else torch.float64)
            for share, tensor in zip(shares, tensors):
                total += share * tensor.to(total.dtype)
            result[key] = total.to(dtype)
        else:
            # A counter such as num_batches_tracked: a weighted mean would turn it into a float
            # (and load_state_dict would then truncate it); the largest count is what it means.
            result[key] = torch.stack(tensors).amax(dim=0) if dtype != torch.bool else torch.stack(tensors).any(dim=0)
    return result


# ---------------------------------------------------------------------------------------------
# Sampling, dropout and one round
# ---------------------------------------------------------------------------------------------


def sample_clients(num_clients: int, fraction: float, generator: torch.Generator) -> list[int]:
    """``max(round(fraction * num_clients), 1)`` distinct client indices, sorted, drawn with the
    given ``torch.Generator``. (Python's ``round``: halves go to the even neighbour.)"""
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction C must lie in (0, 1], got {fraction!r}")
    count = max(round(fraction * num_clients), 1)
    chosen = torch.randperm(int(num_clients), generator=generator)[:count]
    return sorted(int(i) for i in chosen)


@dataclass
class RoundResult:
    """What one round produced."""

    state: State  # the new global state (unchanged if nobody reported)
    sampled: list[int]  # the clients asked this round
    reported: list[int]  # those that did not drop out
    message: str  # e.g. "round 7: no client reported; global model unchanged"


def _copy_state(model: nn.Module) -> State:
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


def run_round(
    model: nn.Module,
    client_datasets: Sequence[Dataset],
    *,
    fraction: float,
    epochs: int,
    batch_size: int | None,
    lr: float,
    dropout: float = 0.0,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    aggregate: Aggregator = fedavg,
    round_number: int | None = None,
    mu: float = 0.0,
) -> RoundResult:
    """One FedAvg round: sample, train the reporting clients, aggregate with
    ``aggregate(states, weights)``. ``aggregate`` is the hook lessons 06/08 replace (encrypted
    or noised aggregation). Does not mutate ``model``; the caller loads ``state``.

    Random draws, all from ``generator`` and in this order: the sample; one uniform number per
    sampled client (it drops out when the number is below ``dropout``, so a client that drops
    out reports nothing); one shuffling seed per reporting client. Weights are the reporting
    clients' numbers of examples. ``round_number`` (optional) only labels the message.
    ``mu > 0`` runs FedProx's clients (see ``client_update``).
    """
    if not 0 <= dropout <= 1:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    prefix = f"round {round_number}: " if round_number is not None else ""
    sampled = sample_clients(len(client_datasets), fraction, generator)
    stays = torch.rand(len(sampled), generator=generator) >= dropout
    reported = [k for k, stay in zip(sampled, stays.tolist()) if stay]
    if not reported:
        return RoundResult(_copy_state(model), sampled, [],
                           f"{prefix}no client reported (all {len(sampled)} sampled dropped out); global model unchanged")
    seeds = torch.randint(_SEED_RANGE, (len(reported),), generator=generator).tolist()
    states = [client_update(model, client_datasets[k], epochs=epochs, batch_size=batch_size, lr=lr,
                            seed=seed, device=device, mu=mu)
              for k, seed in zip(reported, seeds)]
    weights = [len(client_datasets[k]) for k in reported]
    state = aggregate(states, weights)
    message = f"{prefix}{len(reported)} of {len(sampled)} sampled clients reported ({sum(weights)} examples)"
    return RoundResult(state, sampled, reported, message)


# ---------------------------------------------------------------------------------------------
# The server loop
# ---------------------------------------------------------------------------------------------


@dataclass
class History:
    """Test metrics of a federated run, recorded every ``eval_every`` rounds (and at the end)."""

    rounds: list[int]
    accuracy: list[float]
    loss: list[float]
    rounds_to_target: int | None
    reported: list[int] = field(default_factory=list)  # how many clients reported, every round
    messages: list[str] = field(default_factory=list)  # RoundResult.message, every round


def federated_averaging(
    model: nn.Module,
    client_datasets: Sequence[Dataset],
    test_set: Dataset,
    *,
    rounds: int,
    fraction: float = 1.0,
    epochs: int = 1,
    batch_size: int | None = 10,
    lr: float = 0.05,
    dropout: float = 0.0,
    seed: int = 0,
    target_accuracy: float | None = None,
    eval_every: int = 1,
    device: torch.device | str | None = None,
    aggregate: Aggregator = fedavg,
    progress: bool = True,
    mu: float = 0.0,
) -> History:
    """The server loop: run_round ``rounds`` times (stop early when ``target_accuracy`` is
    reached), loading each new state into ``model`` (which is therefore trained in place: the
    caller passes its global model) and evaluating on ``test_set``.

    ``seed`` seeds the one generator every round draws from; ``mu > 0`` runs FedProx. ``rounds_to_target`` is the first
    evaluated round whose test accuracy is at least ``target_accuracy`` (None if never).
    """
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if int(eval_every) != eval_every or eval_every < 1:
        raise ValueError(f"eval_every must be a positive integer, got {eval_every!r}")
    device = get_device() if device is None else torch.device(device)
    generator = torch.Generator().manual_seed(int(seed))
    history = History(rounds=[], accuracy=[], loss=[], rounds_to_target=None)
    bar = tqdm(range(1, int(rounds) + 1), desc="rounds", leave=False, disable=not progress)
    try:
        for round_number in bar:
            result = run_round(model, client_datasets, fraction=fraction, epochs=epochs,
                               batch_size=batch_size, lr=lr, dropout=dropout, generator=generator,
                               device=device, aggregate=aggregate, round_number=round_number, mu=mu)
            model.load_state_dict(result.state)
            history.reported.append(len(result.reported))
            history.messages.append(result.message)
            if round_number % eval_every and round_number != rounds:
                continue
            loss, accuracy = evaluate(model, test_set, device=device)
            history.rounds.append(round_number)
            history.accuracy.append(accuracy)
            history.loss.append(loss)
            bar.set_postfix(acc=f"{accuracy:.3f}")
            if target_accuracy is not None and accuracy >= target_accuracy:
                history.rounds_to_target = round_number
                break
    finally:
        bar.close()
    return history
