"""Lesson 11: the course's Federated Averaging handed to TensorFlow Federated and to Flower.

The reference adapters of lesson 11, which the lesson's tests and its later sections use:

- ``Setting``: one experiment (clients, rounds, E, B, learning rate, seed) and its clients'
  data, rebuilt from those few numbers in any process (a Flower client may run in another one);
- ``round_seeds`` and ``epoch_orders`` replay the random draws of
  ``fedcourse.fedavg.federated_averaging`` (every client asked, none dropping out), so that
  another framework can feed each client exactly the batches the course's ``client_update``
  trains on;
- ``tff_client_data``: one client's data as a ``tf.data.Dataset`` of those batches;
- ``keras_model`` and ``torch_state``: the course's ``LogisticRegression`` as a Keras model
  and back (Keras stores a dense layer's kernel as inputs x outputs, PyTorch as outputs x inputs);
- ``build_tff_fedavg`` and ``tff_fedavg``: TFF's ``build_weighted_fed_avg`` run from given
  initial weights;
- ``CourseClient``, ``client_app``, ``server_app`` and ``flower_fedavg``: a Flower
  ``ClientApp`` whose ``fit`` runs the course's ``client_update``, a ``ServerApp`` with Flower's
  ``FedAvg`` strategy, and a simulation of the two;
- ``course_states``: the course's own ``federated_averaging``, with the global state recorded
  after every round;
- ``stop_tff_workers``: stops the ``worker_binary`` process that TFF's default execution
  context starts (it would outlive Python otherwise).

TensorFlow, TFF and Flower are imported inside the functions that need them: this module
imports in the main environment too, which has none of them (lesson 11 runs in its own).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from fedcourse.checks import toolbox
from fedcourse.fedavg import (_SEED_RANGE, _dataset_tensors, client_update, epoch_orders, fedavg,  # noqa: F401
                              federated_averaging, sample_clients)
from fedcourse.models import LogisticRegression

__all__ = [
    "TFF_VERSION",
    "Setting",
    "round_seeds",
    "epoch_orders",
    "flat_arrays",
    "tff_client_data",
    "keras_model",
    "keras_weights",
    "torch_state",
    "build_tff_fedavg",
    "tff_fedavg",
    "CourseClient",
    "client_app",
    "server_app",
    "flower_fedavg",
    "course_states",
    "largest_gap",
    "tff_missing",
    "tff_skip_reason",
    "stop_tff_workers",
    "quiet_flower",
]

TFF_VERSION = "0.87.0"
INPUTS = 28 * 28
CLASSES = 10
State = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The experiment, and the random draws of the course's FedAvg
# ---------------------------------------------------------------------------------------------


@toolbox
def round_seeds(num_clients: int, rounds: int, seed: int) -> list[list[int]]:
    """``seeds[r][k]``: the shuffling seed client ``k`` gets in round ``r + 1`` of
    ``federated_averaging(..., fraction=1.0, dropout=0.0, seed=seed)``.

    Replays that run's generator: each round draws the sample (all clients, sorted), one
    dropout number per client, then one seed per reporting client, in client order."""
    generator = torch.Generator().manual_seed(int(seed))
    table = []
    for _ in range(int(rounds)):
        sampled = sample_clients(int(num_clients), 1.0, generator)
        torch.rand(len(sampled), generator=generator)
        table.append(torch.randint(_SEED_RANGE, (len(sampled),), generator=generator).tolist())
    return table


@toolbox
def flat_arrays(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """A client's (images, labels) as numpy arrays: images float32 (n, 784), flattened row by
    row as ``LogisticRegression`` flattens them; labels int64 (n,)."""
    inputs, labels = _dataset_tensors(dataset)
    return (inputs.reshape(len(labels), -1).numpy().astype(np.float32, copy=False),
            labels.numpy().astype(np.int64, copy=False))


@functools.lru_cache(maxsize=8)
def _clients(num_clients: int, split: str, examples: int, seed: int) -> tuple[Subset, ...]:
    from fedcourse.mnist import load_mnist
    from fedcourse.partition import iid, quantity_skew, to_subsets

    if split not in ("iid", "quantity_skew"):
        raise ValueError(f"split must be 'iid' or 'quantity_skew', got {split!r}")
    images, labels = load_mnist("train").tensors
    base = TensorDataset(images[:int(examples)], labels[:int(examples)])
    parts = (iid if split == "iid" else quantity_skew)(len(base), int(num_clients), seed=int(seed))
    # Subsets of one TensorDataset: client_update slices them without touching examples one by one.
    return tuple(to_subsets(base, parts))


@dataclass(frozen=True)
class Setting:
    """One FedAvg experiment: who the clients are and how they train.

    The clients hold the first ``examples`` training digits of the course's MNIST sample,
    split by ``split`` ("iid": equal shares; "quantity_skew": very unequal ones) with ``seed``.
    Every round asks every client (C = 1) and nobody drops out. ``batch_size=None`` is
    full-batch training (B = all of a client's data).

    A setting is a handful of numbers, so it travels cheaply to another process, where
    ``clients()`` rebuilds the same data (cached per process)."""

    num_clients: int = 10
    rounds: int = 5
    epochs: int = 1
    batch_size: int | None = 10
    lr: float = 0.1
    seed: int = 0
    split: str = "iid"
    examples: int = 1000

    def clients(self) -> list[Subset]:
        """Each client's data set (a ``Subset``), in client order."""
        return list(_clients(self.num_clients, self.split, self.examples, self.seed))

    def seeds(self) -> list[list[int]]:
        """``seeds()[r][k]``: client k's shuffling seed in round r + 1 (see ``round_seeds``)."""
        return round_seeds(self.num_clients, self.rounds, self.seed)

    def sizes(self) -> list[int]:
        return [len(client) for client in self.clients()]


# ---------------------------------------------------------------------------------------------
# Weights: PyTorch state_dicts, Keras weight lists, Flower's lists of arrays
# ---------------------------------------------------------------------------------------------


def keras_weights(state: State) -> list[np.ndarray]:
    """``LogisticRegression``'s state as Keras ``Dense(10)`` weights: [kernel (784, 10), bias (10,)].

    PyTorch's ``nn.Linear`` computes ``x @ weight.T + bias`` with ``weight`` of shape
    (outputs, inputs); Keras computes ``x @ kernel + bias``: the kernel is the transpose."""
    weight = np.asarray(state["linear.weight"].detach().cpu().numpy(), dtype=np.float32)
    bias = np.asarray(state["linear.bias"].detach().cpu().numpy(), dtype=np.float32)
    return [np.ascontiguousarray(weight.T), bias.copy()]


def torch_state(weights: Sequence) -> State:
    """Keras ``Dense(10)`` weights [kernel (784, 10), bias (10,)] as ``LogisticRegression``'s state."""
    kernel, bias = (np.asarray(w, dtype=np.float32) for w in weights)
    if kernel.shape != (INPUTS, CLASSES) or bias.shape != (CLASSES,):
        raise ValueError(f"expected a kernel (784, 10) and a bias (10,), got {kernel.shape} and {bias.shape}")
    return {"linear.weight": torch.from_numpy(np.ascontiguousarray(kernel.T)),
            "linear.bias": torch.from_numpy(bias.copy())}


def keras_model(state: State | None = None):
    """Logistic regression in Keras: ``Dense(10)`` on flattened 784-pixel inputs, returning logits
    (TFF's loss applies the softmax). With ``state``, its weights are those of that
    ``LogisticRegression`` state, so both models compute the same function."""
    import tensorflow as tf

    model = tf.keras.Sequential([tf.keras.Input(shape=(INPUTS,)), tf.keras.layers.Dense(CLASSES)])
    if state is not None:
        model.set_weights(keras_weights(state))
    return model


def _arrays(state: State) -> list[np.ndarray]:
    """A state_dict as Flower sends it: a list of numpy arrays, in the state's key order."""
    return [value.detach().cpu().numpy().copy() for value in state.values()]


def _state_of(arrays: Sequence, like: State) -> State:
    return {key: torch.tensor(np.asarray(array), dtype=value.dtype).reshape(value.shape)
            for (key, value), array in zip(like.items(), arrays)}


# ---------------------------------------------------------------------------------------------
# TensorFlow Federated
# ---------------------------------------------------------------------------------------------


@toolbox
def tff_missing() -> str | None:
    """Why TensorFlow Federated cannot run in this kernel (None when it can)."""
    from importlib import metadata

    try:
        version = metadata.version("tensorflow-federated")
    except metadata.PackageNotFoundError:
        return ("TensorFlow Federated is not installed in this kernel: it needs Python 3.11 or older "
                "(Colab runs 3.12) and has Linux x86-64 wheels only")
    if version != TFF_VERSION:
        return f"this kernel has TensorFlow Federated {version}; the lesson is written for {TFF_VERSION}"
    return None


@toolbox
def tff_skip_reason() -> str | None:
    """Why a TFF test or section is skipped: only in Colab (Python 3.12), where TFF cannot install.
    Elsewhere None, and a kernel without TFF fails the TFF tests (the lesson's own kernel has it)."""
    reason = tff_missing()
    in_colab = "google.colab" in __import__("sys").modules or "COLAB_RELEASE_TAG" in os.environ
    if reason is None or not in_colab:
        return None
    return f"Skipped in Colab: {reason}. Run the lesson locally in its own kernel to run this part."


def tff_client_data(dataset: Dataset, epochs: int, batch_size: int | None, seed: int):
    """One client's data as a ``tf.data.Dataset`` of exactly the batches ``client_update(...,
    epochs=epochs, batch_size=batch_size, seed=seed)`` trains on, epoch after epoch.

    Each epoch visits the examples in its own order (``epoch_orders``) and is cut into batches
    on its own, so that no batch spans two epochs (unlike ``repeat().shuffle().batch()``).
    TFF's client goes through the data set once: all the epochs are in it."""
    import tensorflow as tf

    images, labels = flat_arrays(dataset)
    batch = len(labels) if batch_size is None else int(batch_size)
    data = None
    for order in epoch_orders(len(labels), epochs, seed):
        index = order.numpy()
        epoch = tf.data.Dataset.from_tensor_slices((images[index], labels[index])).batch(batch)
        data = epoch if data is None else data.concatenate(epoch)
    return data


def _input_spec():
    import tensorflow as tf

    return (tf.TensorSpec(shape=(None, INPUTS), dtype=tf.float32), tf.TensorSpec(shape=(None,), dtype=tf.int64))


def build_tff_fedavg(lr: float):
    """TFF's weighted FedAvg for the Keras logistic regression: clients run plain SGD at ``lr``,
    the server adds the weighted mean of the clients' changes (an SGD step of 1 on it), and
    clients are weighted by how many examples they trained on."""
    import tensorflow as tf
    import tensorflow_federated as tff

    def model_fn():
        return tff.learning.models.from_keras_model(
            keras_model(), input_spec=_input_spec(),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    return tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=lr),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
        client_weighting=tff.learning.ClientWeighting.NUM_EXAMPLES)


def tff_fedavg(process, setting: Setting, initial_state: State) -> list[State]:
    """``setting.rounds`` rounds of a process from ``build_tff_fedavg`` (built with ``setting.lr``),
    started at ``initial_state``; the global state after each round, as PyTorch state_dicts."""
    import tensorflow_federated as tff

    state = process.initialize()
    state = process.set_model_weights(state, tff.learning.models.ModelWeights(
        trainable=keras_weights(initial_state), non_trainable=[]))
    clients = setting.clients()
    states = []
    for seeds in setting.seeds():
        data = [tff_client_data(client, setting.epochs, setting.batch_size, seed) for client, seed in zip(clients, seeds)]
        state = process.next(state, data).state
        states.append(torch_state(process.get_model_weights(state).trainable))
    return states


@toolbox
def stop_tff_workers(timeout: float = 10.0) -> int:
    """Stop the ``worker_binary`` processes TFF's default execution context started from this
    process (it runs the computations, and outlives Python unless stopped). Returns how many it
    stopped. TFF starts a new one when it next runs a computation."""
    import psutil

    workers = [child for child in psutil.Process().children(recursive=True)
               if child.name().startswith("worker_binary")]
    for worker in workers:
        worker.send_signal(signal.SIGINT)  # what TFF itself sends it
    _, alive = psutil.wait_procs(workers, timeout=timeout)
    for worker in alive:
        worker.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return len(workers)


# ---------------------------------------------------------------------------------------------
# Flower
# ---------------------------------------------------------------------------------------------


@toolbox
def quiet_flower() -> None:
    """Flower without telemetry (it would try to reach the network) and with only warnings logged,
    and Ray without its dashboard's chatter. Call before importing flwr."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts a worker process per CPU ahead of need; one actor does all the work here, and
    # idle workers only add processes and threads (the grader counts them).
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    # Ray waits 20 s for its control server to answer; a busy two-core machine can need longer.
    os.environ.setdefault("RAY_NUM_REDIS_GET_RETRIES", "60")


def _numpy_client_base():
    from flwr.client import NumPyClient

    return NumPyClient


class CourseClient:
    """A Flower client whose ``fit`` is the course's ``client_update`` (built by ``client_app``)."""

    def __init__(self, setting: Setting, k: int):
        self.setting, self.k = setting, int(k)
        self.dataset = setting.clients()[self.k]
        self.seeds = [row[self.k] for row in setting.seeds()]

    def get_parameters(self, config):
        return _arrays(LogisticRegression().state_dict())

    def fit(self, parameters, config):
        like = LogisticRegression()
        like.load_state_dict(_state_of(parameters, like.state_dict()))
        seed = self.seeds[int(config["server_round"]) - 1]
        state = client_update(like, self.dataset, epochs=self.setting.epochs, batch_size=self.setting.batch_size,
                              lr=self.setting.lr, seed=seed, device="cpu")
        return _arrays(state), len(self.dataset), {}


@functools.cache
def _flower_client_class():
    """CourseClient as a subclass of Flower's NumPyClient (Flower is imported only when needed)."""
    return type("CourseClient", (CourseClient, _numpy_client_base()), {"__module__": __name__})


def client_app(setting: Setting):
    """A Flower ``ClientApp``: the virtual client with partition id k trains client k's data of
    ``setting`` with the course's ``client_update``, with the seed of the round the server names."""
    from flwr.client import ClientApp

    def client_fn(context):
        k = int(context.node_config["partition-id"])
        return _flower_client_class()(setting, k).to_client()

    return ClientApp(client_fn=client_fn)


def server_app(setting: Setting, initial_state: State, record: Callable[[int, list], None]):
    """A Flower ``ServerApp`` running ``setting.rounds`` rounds of Flower's ``FedAvg`` from
    ``initial_state``, asking all ``setting.num_clients`` clients every round and telling them
    the round number; ``record(round, arrays)`` receives the global weights before the first
    round (round 0) and after each round."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg

    def evaluate(server_round, arrays, config):
        record(server_round, [np.array(a, copy=True) for a in arrays])
        return None

    def server_fn(context):
        strategy = FedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0,
            min_fit_clients=setting.num_clients, min_available_clients=setting.num_clients,
            initial_parameters=ndarrays_to_parameters(_arrays(initial_state)),
            on_fit_config_fn=lambda server_round: {"server_round": server_round},
            evaluate_fn=evaluate)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=setting.rounds))

    return ServerApp(server_fn=server_fn)


RAY = "ray"
IN_PROCESS = "in-process"
RAY_BACKEND = {"client_resources": {"num_cpus": 2, "num_gpus": 0.0},
               "init_args": {"include_dashboard": False, "object_store_memory": 100 * 2**20,
                             "configure_logging": False}}


def _in_process_backend() -> bool:
    """Register Flower's simulation backend ``"in-process"`` (True), or say it cannot be (False).

    Flower's simulation engine hands each message for a virtual client to a backend; Ray's runs
    the ``ClientApp`` in worker processes, which take 10-20 s to start on two cores
    (Ray itself, then processes that import torch). Clients that train for a millisecond need
    none of that: this backend runs the ``ClientApp`` in this process, one message at a time,
    through the same engine, messages and apps. Flower 1.12 lets a backend be added
    (``supported_backends``); later versions run virtual clients on Ray only."""
    try:
        from flwr.server.superlink.fleet.vce.backend import Backend, supported_backends
    except ImportError:
        return False
    if IN_PROCESS in supported_backends:
        return True

    class InProcessBackend(Backend):
        """Runs each virtual client's ClientApp in this process, one message at a time."""

        def __init__(self, backend_config):
            super().__init__(backend_config)
            self.app_fn = None

        def build(self, app_fn):
            self.app_fn = app_fn

        @property
        def num_workers(self) -> int:
            return 1

        def is_worker_idle(self) -> bool:
            return True

        def terminate(self) -> None:
            self.app_fn = None

        def process_message(self, message, context):
            return self.app_fn()(message=message, context=context), context

    supported_backends[IN_PROCESS] = InProcessBackend
    return True


RAY_START_ATTEMPTS = 3


def start_ray(init_args: dict, attempts: int = RAY_START_ATTEMPTS) -> None:
    """Start Ray in this process as Flower's Ray backend would, trying again when it fails.

    On a busy machine Ray's control server (GCS) can fail to come up in time. Flower 1.12 then
    fails while cleaning up and its simulation never returns: the cell would hang. Started here,
    a failure is retried, and the last one is an error that says what happened."""
    import sys

    import ray

    last = None
    for _ in range(attempts):
        if ray.is_initialized():
            return
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": ":".join(sys.path)}}, **init_args)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises RuntimeError, ConnectionError, ...
            last = exc
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001 - nothing left to shut down
                pass
    first_line = (str(last).strip().splitlines() or [type(last).__name__])[0]
    raise RuntimeError(f"Ray, the engine of Flower's simulation here, did not start in {attempts} tries "
                       f"(last: {first_line}). This happens on a very busy machine: run the cell again "
                       "when it is quieter.") from last


@toolbox
def run_flower(server, client, num_clients: int, backend: str = IN_PROCESS) -> float:
    """Flower's simulation engine running ``server`` and ``client`` with ``num_clients`` virtual
    clients; returns the seconds it took.

    ``backend="in-process"`` runs the clients in this process (see ``_in_process_backend``; Ray,
    where Flower offers no other backend); ``backend="ray"`` runs them on Ray, as Flower does by
    default, in one worker process (each client asks for two CPUs: clients this small gain nothing
    from a second process, which costs start-up time and memory)."""
    import logging

    quiet_flower()
    import flwr.simulation

    if backend == IN_PROCESS and not _in_process_backend():
        backend = RAY
    config = {key: dict(value) for key, value in RAY_BACKEND.items()} if backend == RAY else {}
    if backend == RAY:
        start_ray(config["init_args"])  # Flower then uses this Ray instead of starting its own
    logging.getLogger("flwr").setLevel(logging.WARNING)
    start = time.perf_counter()
    try:  # Flower 1.12's run_simulation waits 5 s for the server before starting the clients
        import inspect

        from flwr.common.telemetry import EventType
        from flwr.simulation.run_simulation import _run_simulation

        if "delay_start" not in inspect.signature(_run_simulation).parameters:
            raise ImportError
    except (ImportError, AttributeError):
        flwr.simulation.run_simulation(server_app=server, client_app=client, num_supernodes=int(num_clients),
                                       backend_name=backend, backend_config=config)
    else:
        _run_simulation(num_supernodes=int(num_clients), client_app=client, server_app=server, backend_name=backend,
                        backend_config=config, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE, delay_start=0)
    return time.perf_counter() - start


def flower_fedavg(setting: Setting, initial_state: State, backend: str = IN_PROCESS) -> list[State]:
    """``setting`` run on Flower's simulation engine; the global state after each round."""
    recorded: dict[int, list] = {}
    run_flower(server_app(setting, initial_state, lambda r, arrays: recorded.__setitem__(r, arrays)),
               client_app(setting), setting.num_clients, backend=backend)
    missing = [r for r in range(1, setting.rounds + 1) if r not in recorded]
    if missing:
        raise RuntimeError(f"Flower's server recorded no weights after rounds {missing}")
    return [_state_of(recorded[r], initial_state) for r in range(1, setting.rounds + 1)]


# ---------------------------------------------------------------------------------------------
# The course's own FedAvg, and the comparison
# ---------------------------------------------------------------------------------------------


def course_states(setting: Setting, initial_state: State) -> list[State]:
    """``setting`` run by the course's ``federated_averaging`` from ``initial_state``; the global
    state after each round (recorded by the aggregation hook)."""
    states = []

    def aggregate(client_states, weights):
        state = fedavg(client_states, weights)
        states.append({key: value.clone() for key, value in state.items()})
        return state

    model = LogisticRegression()
    model.load_state_dict(initial_state)
    inputs, labels = _dataset_tensors(setting.clients()[0])
    test = TensorDataset(inputs[:1], labels[:1])  # evaluation is not what is compared: one example
    federated_averaging(model, setting.clients(), test, rounds=setting.rounds, fraction=1.0,
                        epochs=setting.epochs, batch_size=setting.batch_size, lr=setting.lr, seed=setting.seed,
                        device="cpu", aggregate=aggregate, progress=False)
    return states


def largest_gap(states_a: Sequence[State], states_b: Sequence[State]) -> float:
    """The largest absolute difference between two runs' global weights, over all rounds and entries."""
    if len(states_a) != len(states_b):
        raise ValueError(f"the runs have {len(states_a)} and {len(states_b)} rounds")
    gap = 0.0
    for a, b in zip(states_a, states_b):
        if set(a) != set(b):
            raise ValueError(f"different entries: {sorted(a)} and {sorted(b)}")
        for key in a:
            gap = max(gap, float((a[key].double() - b[key].double()).abs().max()))
    return gap
