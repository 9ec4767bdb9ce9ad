"""A Gboard-style private federated system: the reference implementations of lesson 10.

The parts (Bonawitz et al. 2019, "Towards Federated Learning at Scale: System Design"; Yang et
al. 2018 for the query-suggestion case; McMahan et al. 2018 for DP-FedAvg):

- **The on-device training cache** (``TrainingCache``): one SQLite database per device, a table
  ``impressions(time, features, clicked)``; impressions are logged in one transaction per
  batch (a bad record rolls the whole batch back, with a ``ValueError``), expire after a
  time-to-live and are capped in number (the oldest go first). ``examples(now)`` deletes what
  has expired and returns the rest as tensors.
- **Eligibility and selection** (``eligible_devices``, ``select_devices``, ``close_round``):
  a device checks in only when charging, idle and on an unmetered network; the server keeps
  each checked-in device independently with the plan's probability q (over-selection: q is
  chosen so that about 130 % of the target is asked), closes the round at the target number of
  reports or at the deadline, discards stragglers and abandons a round with too few reports.
- **Plan and checkpoint** (``plan_to_bytes``, ``encode_checkpoint``, ``decode_checkpoint``,
  ``train_on_device``): the plan is JSON; a checkpoint is a small self-describing binary format
  (magic, a JSON header of names and shapes, float32 little-endian values), never pickle, so
  that loading it cannot run code. The device trains with full-batch gradient descent from its
  cache and returns its update (new weights minus the checkpoint's), sent as a checkpoint.
- **A private round** (``device_report``, ``private_round``): each device clips its update to
  norm C and adds its share N(0, sigma^2 / m_min) of the noise, sigma = z * 2C; secure
  aggregation (``fedcourse.secagg.secure_sum``, with a Shamir threshold of at least m_min, so
  that no sum of fewer than m_min reports is ever unmasked: the round is abandoned instead)
  gives the server the noised sum only; the server divides by the target K. ``round_epsilons``: the accountant of lesson 08 fed the plan's q.
- **Federated evaluation** (``federated_evaluation``): held-out devices count impressions,
  clicks, suggestions the model would show and clicks among them; the server adds the counts.
- **The driver** (``simulate``): rounds over the night, with dropouts and stragglers, for the
  private system and for plain FedAvg (no clipping, no noise, no secure aggregation).

``simulate`` takes the parts as arguments (``Parts``), so a lesson can run the system with the
student's own functions.
"""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3
import struct
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fedcourse.checks import toolbox
from fedcourse.privacy import DEFAULT_ORDERS, clip_update, rdp_subsampled_gaussian, rdp_to_epsilon
from fedcourse.secagg import ProtocolAborted, majority_threshold, secure_sum
from fedcourse.suggestions import (CHARGING, IDLE, NOW, NUM_FEATURES, UNMETERED, Population, as_tensors,
                                   click_probability, initial_state)

__all__ = [
    "CHECKPOINT_MAGIC",
    "TrainingCache",
    "eligible_devices",
    "select_devices",
    "close_round",
    "make_plan",
    "plan_to_bytes",
    "plan_from_bytes",
    "encode_checkpoint",
    "decode_checkpoint",
    "train_on_device",
    "flatten_update",
    "unflatten_update",
    "encoding_bound",
    "device_report",
    "private_round",
    "round_epsilons",
    "federated_evaluation",
    "Parts",
    "RoundLog",
    "Run",
    "build_caches",
    "round_times",
    "simulate",
]

CHECKPOINT_MAGIC = b"FCKP"


# ---------------------------------------------------------------------------------------------
# 1. The on-device training cache
# ---------------------------------------------------------------------------------------------


def _check_impression(record) -> tuple[float, str, int]:
    """(time, features as JSON, clicked as 0/1) of a valid impression, else ValueError."""
    if not isinstance(record, Mapping) or set(record) != {"features", "clicked", "time"}:
        raise ValueError(f"an impression is a dict with keys features, clicked and time, got {record!r}")
    features, clicked, when = record["features"], record["clicked"], record["time"]
    try:
        values = [float(v) for v in features]
    except (TypeError, ValueError):
        raise ValueError(f"features must be {NUM_FEATURES} numbers, got {features!r}") from None
    if len(values) != NUM_FEATURES or not all(math.isfinite(v) for v in values):
        raise ValueError(f"features must be {NUM_FEATURES} finite numbers, got {features!r}")
    if clicked not in (0, 1) or isinstance(clicked, float) and not float(clicked).is_integer():
        raise ValueError(f"clicked must be True or False (or 1 or 0), got {clicked!r}")
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        raise ValueError(f"time must be a finite number of hours, got {when!r}")
    return float(when), json.dumps(values), int(clicked)


class TrainingCache:
    """A device's training cache in SQLite: impressions expire after ``ttl`` hours and at most
    ``capacity`` are kept (the oldest are dropped first)."""

    def __init__(self, path, *, ttl: float, capacity: int) -> None:
        if not ttl > 0 or int(capacity) != capacity or capacity < 1:
            raise ValueError(f"ttl must be > 0 and capacity a positive integer, got {ttl!r}, {capacity!r}")
        self.ttl, self.capacity = float(ttl), int(capacity)
        self.connection = sqlite3.connect(str(path))
        with self.connection:
            self.connection.execute(
                "CREATE TABLE IF NOT EXISTS impressions ("
                " id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL,"
                " features TEXT NOT NULL, clicked INTEGER NOT NULL CHECK (clicked IN (0, 1)))")
            self.connection.execute("CREATE INDEX IF NOT EXISTS by_time ON impressions (time)")

    def log(self, impressions) -> None:
        """Store a batch of impressions, all or none of them."""
        rows = [_check_impression(record) for record in impressions]  # every record checked first
        with self.connection:  # one transaction: committed at the end, rolled back on any error
            self.connection.executemany("INSERT INTO impressions (time, features, clicked) VALUES (?, ?, ?)", rows)
            self.connection.execute(
                "DELETE FROM impressions WHERE id NOT IN "
                "(SELECT id FROM impressions ORDER BY time DESC, id DESC LIMIT ?)", (self.capacity,))

    def examples(self, now: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Delete the impressions older than ``ttl`` hours at time ``now``; return the rest,
        oldest first: (features (n, 5) float32, clicked (n,) float32)."""
        with self.connection:
            self.connection.execute("DELETE FROM impressions WHERE time < ?", (float(now) - self.ttl,))
        rows = self.connection.execute("SELECT features, clicked FROM impressions ORDER BY time, id").fetchall()
        if not rows:
            return torch.zeros(0, NUM_FEATURES), torch.zeros(0)
        features = torch.tensor([json.loads(f) for f, _ in rows], dtype=torch.float32)
        return features, torch.tensor([float(c) for _, c in rows], dtype=torch.float32)

    def __len__(self) -> int:
        return self.connection.execute("SELECT COUNT(*) FROM impressions").fetchone()[0]

    def close(self) -> None:
        self.connection.close()


# ---------------------------------------------------------------------------------------------
# 2. Eligibility, selection, closing a round
# ---------------------------------------------------------------------------------------------


def eligible_devices(devices, hour: int) -> list[int]:
    """Ids of the devices that check in at ``hour``: charging, idle and unmetered, all three."""
    return [d.device_id for d in devices
            if d.states[hour, CHARGING] and d.states[hour, IDLE] and d.states[hour, UNMETERED]]


def select_devices(checked_in: Sequence[int], rate: float, generator: torch.Generator) -> list[int]:
    """Each checked-in device independently with probability ``rate`` (Poisson sampling)."""
    if not 0 < rate <= 1:
        raise ValueError(f"rate must lie in (0, 1], got {rate}")
    keep = torch.rand(len(checked_in), generator=generator) < rate
    return [d for d, k in zip(checked_in, keep.tolist()) if k]


def close_round(arrivals: Mapping[int, float], target: int, deadline: float, min_reports: int) -> list[int]:
    """The reports the server accepts, in order of arrival: the first ``target`` that arrive by
    the deadline (stragglers and the rest discarded), or [] when fewer than ``min_reports`` do."""
    on_time = sorted((t, d) for d, t in arrivals.items() if t <= deadline)
    accepted = [d for _, d in on_time[:target]]
    return accepted if len(accepted) >= min_reports else []


# ---------------------------------------------------------------------------------------------
# 3. Plan and checkpoint
# ---------------------------------------------------------------------------------------------


@toolbox
def make_plan(*, target: int = 25, over_selection: float = 1.3, expected_check_ins: float = 190.0,
              min_reports: int = 15, deadline: float = 10.0, learning_rate: float = 1.0, local_steps: int = 20,
              clip: float = 0.6, noise_multiplier: float = 1.3, ttl: float = 120.0, capacity: int = 200,
              value_bits: int = 16) -> dict:
    """The server's plan, fixed before training: what every device and the accountant use.
    ``selection_rate`` q = over_selection * target / expected_check_ins."""
    rate = min(1.0, over_selection * target / expected_check_ins)
    return {"model": "logistic_regression", "num_features": NUM_FEATURES, "target": target,
            "over_selection": over_selection, "expected_check_ins": expected_check_ins, "selection_rate": rate, "min_reports": min_reports, "deadline": deadline,
            "learning_rate": learning_rate, "local_steps": local_steps, "clip": clip,
            "noise_multiplier": noise_multiplier, "ttl": ttl, "capacity": capacity, "value_bits": value_bits}


@toolbox
def plan_to_bytes(plan: Mapping) -> bytes:
    return json.dumps(dict(plan), sort_keys=True).encode()


@toolbox
def plan_from_bytes(data: bytes) -> dict:
    return json.loads(data.decode())


def encode_checkpoint(state: Mapping[str, torch.Tensor]) -> bytes:
    """magic | uint32 header length | JSON [[name, shape], ...] | float32 little-endian values."""
    header = json.dumps([[name, list(tensor.shape)] for name, tensor in state.items()]).encode()
    values = b"".join(tensor.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
                      for tensor in state.values())
    return CHECKPOINT_MAGIC + struct.pack("<I", len(header)) + header + values


def decode_checkpoint(data: bytes) -> dict[str, torch.Tensor]:
    """The state a checkpoint holds; ValueError for anything that is not one (pickle included)."""
    if not isinstance(data, (bytes, bytearray)) or data[:4] != CHECKPOINT_MAGIC or len(data) < 8:
        raise ValueError("not a checkpoint (wrong magic number): refusing to read it")
    (length,) = struct.unpack_from("<I", data, 4)
    try:
        header = json.loads(bytes(data[8:8 + length]).decode())
        entries = [(str(name), tuple(int(s) for s in shape)) for name, shape in header]
    except (ValueError, TypeError, UnicodeDecodeError):
        raise ValueError("the checkpoint's header is not valid") from None
    offset, state = 8 + length, {}
    for name, shape in entries:
        count = math.prod(shape)
        if offset + 4 * count > len(data):
            raise ValueError("the checkpoint is truncated")
        values = np.frombuffer(bytes(data[offset:offset + 4 * count]), dtype="<f4").astype(np.float32)
        state[name] = torch.from_numpy(values.copy()).reshape(shape)
        offset += 4 * count
    if offset != len(data):
        raise ValueError("the checkpoint has trailing bytes")
    return state


def train_on_device(plan: Mapping, state: Mapping[str, torch.Tensor], features: torch.Tensor,
                    labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``plan['local_steps']`` steps of full-batch gradient descent (learning rate
    ``plan['learning_rate']``) on the mean binary cross-entropy of the cache's examples,
    starting from ``state``; returns the update (new weights minus ``state``'s), float32."""
    weight, bias = state["weight"].float().clone(), state["bias"].float().clone()
    features, labels = torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.float32)
    if len(labels) > 0:
        for _ in range(int(plan["local_steps"])):
            error = click_probability({"weight": weight, "bias": bias}, features) - labels
            weight = weight - plan["learning_rate"] * features.T @ error / len(labels)
            bias = bias - plan["learning_rate"] * error.mean().reshape(1)
    return {"weight": weight - state["weight"].float(), "bias": bias - state["bias"].float()}


# ---------------------------------------------------------------------------------------------
# 4. A private round and its privacy
# ---------------------------------------------------------------------------------------------


@toolbox
def flatten_update(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """weight then bias, as one float64 vector of 6 values."""
    return torch.cat([state["weight"].double().flatten(), state["bias"].double().flatten()])


@toolbox
def unflatten_update(vector) -> dict[str, torch.Tensor]:
    vector = torch.as_tensor(vector, dtype=torch.float64)
    return {"weight": vector[:NUM_FEATURES].float(), "bias": vector[NUM_FEATURES:].float()}


def _noise_share_std(plan: Mapping) -> float:
    """One device's share of the noise: sigma / sqrt(m_min), sigma = z * 2C."""
    return plan["noise_multiplier"] * 2 * plan["clip"] / math.sqrt(plan["min_reports"])


@toolbox
def encoding_bound(plan: Mapping) -> float:
    """The range [-B, B] secure aggregation encodes each value of a report in: the clip plus 8
    standard deviations of the device's noise share, so that clamping (almost) never happens."""
    return plan["clip"] + 8 * _noise_share_std(plan)


def device_report(update: torch.Tensor, plan: Mapping, generator: torch.Generator) -> torch.Tensor:
    """The device's side of DP: clip its update (a vector) to L2 norm C, add its share
    N(0, (z * 2C)^2 / m_min) of the noise on every value."""
    update = torch.as_tensor(update, dtype=torch.float64)
    clipped = clip_update({"update": update}, plan["clip"])["update"]
    return clipped + _noise_share_std(plan) * torch.randn(update.shape, generator=generator, dtype=torch.float64)


def private_round(global_state: Mapping[str, torch.Tensor], updates: Sequence[torch.Tensor], plan: Mapping,
                  generator: torch.Generator, rng: random.Random, drop_at: Mapping[int, str] | None = None):
    """One private round: device reports, secure aggregation, new global state.

    Secure aggregation's threshold is at least ``plan['min_reports']`` (and a majority of the
    phones, lesson 07's default): a sum of fewer than m_min reports, whose noise would be too
    small, is never unmasked; ``secure_sum`` raises ``ProtocolAborted`` instead, and the round
    is abandoned. Returns (new state, the ``SecureSum`` the server ran)."""
    reports = [device_report(u, plan, generator) for u in updates]
    threshold = max(int(plan["min_reports"]), majority_threshold(len(updates)))
    result = secure_sum([r.numpy() for r in reports], clip=encoding_bound(plan), value_bits=plan["value_bits"],
                        threshold=threshold, drop_at=drop_at, rng=rng)
    new = flatten_update(global_state) + torch.as_tensor(result.total) / plan["target"]
    return unflatten_update(new), result


def round_epsilons(plan: Mapping, rounds: int, delta: float) -> list[float]:
    """Epsilon spent after each of ``rounds`` rounds: the subsampled Gaussian at the plan's
    selection rate q and noise multiplier z, composed over the rounds attempted."""
    per_round = rdp_subsampled_gaussian(plan["selection_rate"], plan["noise_multiplier"], DEFAULT_ORDERS)
    return [rdp_to_epsilon(t * per_round, DEFAULT_ORDERS, delta)[0] for t in range(1, rounds + 1)]


# ---------------------------------------------------------------------------------------------
# 5. Federated evaluation
# ---------------------------------------------------------------------------------------------


def federated_evaluation(state: Mapping[str, torch.Tensor], population: Population, threshold: float) -> dict:
    """Each held-out device counts on its own impressions: shown (all of them, for the baseline),
    clicks, what the model would show (probability >= threshold) and the clicks among those;
    the server adds the counts up."""
    impressions = clicks = shown = clicks_shown = 0
    for device in population.held_out:
        features, clicked = as_tensors(device.impressions)
        show = click_probability(state, features) >= threshold
        impressions += len(clicked)
        clicks += int(clicked.sum().item())
        shown += int(show.sum().item())
        clicks_shown += int(clicked[show].sum().item())
    return {"baseline_ctr": clicks / impressions, "model_ctr": clicks_shown / shown if shown else 0.0,
            "clicks_kept": clicks_shown / clicks if clicks else 0.0, "shown_fraction": shown / impressions}


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


@dataclass
class Parts:
    """The system's parts; ``simulate`` calls these (the student's, in the lesson)."""

    cache_class: type = TrainingCache
    eligible_devices: object = eligible_devices
    select_devices: object = select_devices
    close_round: object = close_round
    encode_checkpoint: object = encode_checkpoint
    decode_checkpoint: object = decode_checkpoint
    train_on_device: object = train_on_device
    private_round: object = private_round


@dataclass
class RoundLog:
    hour: int
    checked_in: int
    selected: int
    reports: int  # accepted
    dropped: int  # selected, never reported
    stragglers: int  # reported after the deadline or after the round closed
    abandoned: bool
    accepted: list[int] = field(default_factory=list)  # ids of the devices whose report counted
    bytes_sent: list[int] = field(default_factory=list)  # by each device whose report counted
    masked_example: np.ndarray | None = None  # one masked input, as the server received it
    noised_sum: np.ndarray | None = None


@dataclass
class Run:
    states: list[dict]  # the global model after each round
    rounds: list[RoundLog]
    seconds: float


def build_caches(population: Population, folder, plan: Mapping, cache_class=TrainingCache) -> dict:
    """One cache file per training device in ``folder``, each filled in ONE ``log`` call."""
    caches = {}
    for device in population.devices:
        cache = cache_class(os.path.join(folder, f"device-{device.device_id}.sqlite"), ttl=plan["ttl"],
                            capacity=plan["capacity"])
        cache.log(device.impressions)
        caches[device.device_id] = cache
    return caches


def round_times(rounds: int) -> list[tuple[int, float]]:
    """(hour of the day, time in hours) of each round: every half hour from 22:00 to 06:00,
    night after night, starting at ``NOW`` (22:00 on the first night)."""
    return [(int(22 + i % 16 / 2) % 24, NOW + 24.0 * (i // 16) + (i % 16) / 2) for i in range(rounds)]


def simulate(population: Population, caches: Mapping, plan: Mapping, rounds: int, *, private: bool = True,
             dropout: float = 0.2, seed: int = 0, parts: Parts | None = None, progress: bool = False) -> Run:
    """Run ``rounds`` rounds. Each round: the devices eligible at its hour check in, the server
    selects with the plan's rate, sends plan and checkpoint; a selected device drops with
    probability ``dropout``, else reports after a random time (lognormal, median 4 minutes);
    the server closes the round (target or deadline) and aggregates: privately (clip, noise
    shares, secure aggregation; a round whose secure aggregation aborts, ``ProtocolAborted``,
    is abandoned and changes nothing) or, with ``private=False``, as plain FedAvg (mean of the raw
    updates, no secure aggregation)."""
    from tqdm.auto import tqdm

    parts = parts or Parts()
    generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator().manual_seed(seed + 1)
    times = np.random.default_rng(seed)
    rng = random.Random(seed)
    devices = {d.device_id: d for d in population.devices}
    state = {k: v.clone() for k, v in initial_state().items()}
    states, logs = [], []
    start = time.perf_counter()
    plan_bytes = plan_to_bytes(plan)
    for hour, now in tqdm(round_times(rounds), desc="rounds", disable=not progress):
        checked_in = parts.eligible_devices(list(devices.values()), hour)
        selected = parts.select_devices(checked_in, plan["selection_rate"], generator)
        dropped = times.random(len(selected)) < dropout
        delays = times.lognormal(math.log(4.0), 0.6, len(selected))
        arrivals = {d: (math.inf if drop else float(t)) for d, drop, t in zip(selected, dropped, delays)}
        accepted = parts.close_round(arrivals, plan["target"], plan["deadline"], plan["min_reports"])
        log = RoundLog(hour, len(checked_in), len(selected), len(accepted), int(dropped.sum()),
                       sum(1 for d, t in arrivals.items() if math.isfinite(t) and d not in accepted), not accepted)
        if accepted:
            log.accepted = list(accepted)
            checkpoint = parts.encode_checkpoint(state)
            plan_received = plan_from_bytes(plan_bytes)
            updates, sizes = [], []
            for d in accepted:
                features, labels = caches[d].examples(now)
                start_state = parts.decode_checkpoint(checkpoint)  # on the device
                payload = parts.encode_checkpoint(parts.train_on_device(plan_received, start_state, features, labels))
                sizes.append(len(payload))
                updates.append(flatten_update(parts.decode_checkpoint(payload)))
            if private:
                # The dropped devices took part in secure aggregation's first rounds, then vanished:
                # the server has to remove their masks (lesson 07's recovery).
                lost = [d for d in selected if not math.isfinite(arrivals[d])][:max(0, len(accepted) // 3)]
                padded = updates + [torch.zeros_like(updates[0]) for _ in lost]
                drop_at = {len(updates) + i: "masked_input" for i in range(len(lost))}
                try:
                    state, result = parts.private_round(state, padded, plan, noise_generator, rng, drop_at)
                except ProtocolAborted:  # too few survived secure aggregation: nothing is released
                    log.abandoned, log.accepted, log.reports = True, [], 0
                else:
                    log.bytes_sent = [result.clients[i].bytes_sent for i in result.survivors]
                    log.noised_sum = np.asarray(result.total)
            else:
                mean = torch.stack(updates).mean(dim=0)
                state = unflatten_update(flatten_update(state) + mean)
                log.bytes_sent = sizes
        logs.append(log)
        states.append({k: v.clone() for k, v in state.items()})
    return Run(states, logs, time.perf_counter() - start)
