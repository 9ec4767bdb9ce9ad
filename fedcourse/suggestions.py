"""A simulated population of phones that show query suggestions: the data of lesson 10.

Modelled on the Gboard query-suggestion case study (Yang et al. 2018, "Applied Federated
Learning: Improving Google Keyboard Query Suggestions"): while a user types, the keyboard may
show a suggestion (a web query, a sticker, ...); the user taps it (a click) or ignores it. A
*triggering model* on the phone decides whether a suggestion is worth showing at all. Every
phone keeps what it showed and what happened in its own training cache; nothing leaves it.

The generator is seeded, offline and documented here so that a lesson can reason about it:

- **Impressions.** Each impression has ``NUM_FEATURES = 5`` features, in this order
  (``FEATURE_NAMES``): the relevance score the suggestion's ranker gave it (standard normal),
  how much of the query the user had typed (uniform in [0, 1]), whether the suggestion is
  commercial (0 or 1, probability 0.3), and the hour of the day as ``sin`` and ``cos`` of
  ``2 pi hour / 24``. Whether the user clicks is a Bernoulli draw with probability
  ``sigmoid(bias_u + w_u . x)``: ``w_u = TRUE_WEIGHTS + N(0, 0.4^2)`` per user and a per-user
  click propensity ``bias_u ~ N(-2.3, 0.7^2)``, so users differ both in how often they click
  and in what they click (non-IID).
- **Unbalanced.** A device holds ``ceil(lognormal)`` impressions (median about 60, at most
  400), logged at times spread uniformly over the last ``HISTORY_HOURS = 168`` hours before
  ``NOW``, in time order.
- **Device states over a day** (``states``, a bool array ``(24, 3)``, columns ``CHARGING``,
  ``IDLE``, ``UNMETERED`` for each hour): a phone charges during its user's night (a sleep
  window starting at about 23:00 +- 1.5 h, 5 to 9 hours long, on most nights) and now and then
  in the day; it is idle while its user sleeps and at random moments in the day; it is on an
  unmetered (Wi-Fi) network at home (evening and night, for most users) and at random in the day.
- **Held-out devices.** ``held_out`` are other users drawn the same way, never used for
  training: federated evaluation runs on them.

Also here, as given tools: the triggering model itself (logistic regression on the features,
a state ``{"weight": (5,), "bias": (1,)}`` of float32 tensors) and its click probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fedcourse.checks import toolbox

__all__ = [
    "NUM_FEATURES",
    "FEATURE_NAMES",
    "TRUE_WEIGHTS",
    "HISTORY_HOURS",
    "NOW",
    "CHARGING",
    "IDLE",
    "UNMETERED",
    "Device",
    "Population",
    "make_population",
    "initial_state",
    "click_probability",
    "as_tensors",
]

NUM_FEATURES = 5
FEATURE_NAMES = ("relevance", "typed_fraction", "commercial", "hour_sin", "hour_cos")
TRUE_WEIGHTS = (1.2, 1.0, -1.2, 0.4, -0.4)
HISTORY_HOURS = 168.0  # a week of impressions
NOW = 168.0  # the time (hours) at which training starts: every impression is older
CHARGING, IDLE, UNMETERED = 0, 1, 2


@dataclass
class Device:
    """One phone: its id, its user's impressions (dicts with ``features``, ``clicked``,
    ``time``, in time order) and its states over a day (bool ``(24, 3)``)."""

    device_id: int
    impressions: list[dict] = field(repr=False)
    states: np.ndarray = field(repr=False)

    def __repr__(self) -> str:
        return f"Device({self.device_id}, {len(self.impressions)} impressions)"


@dataclass
class Population:
    """Training devices and held-out devices (disjoint users), and the seed they came from."""

    devices: list[Device]
    held_out: list[Device]
    seed: int


def _states(rng: np.random.Generator) -> np.ndarray:
    hours = np.arange(24)
    states = np.zeros((24, 3), dtype=bool)
    sleep_start = rng.normal(23.0, 1.5)
    sleep_length = rng.uniform(5.0, 9.0)
    asleep = ((hours - sleep_start) % 24) < sleep_length
    charges_at_night = rng.random() < 0.85
    home_wifi = rng.random() < 0.8
    states[:, CHARGING] = (asleep & charges_at_night) | (rng.random(24) < 0.08)
    states[:, IDLE] = asleep | (rng.random(24) < 0.25)
    evening = ((hours - 18) % 24) < 14  # 18:00 to 08:00
    states[:, UNMETERED] = (evening & home_wifi) | (rng.random(24) < 0.2)
    return states


def _device(device_id: int, rng: np.random.Generator) -> Device:
    weights = np.asarray(TRUE_WEIGHTS) + rng.normal(0.0, 0.4, NUM_FEATURES)
    bias = rng.normal(-2.3, 0.7)
    count = int(min(400, math.ceil(rng.lognormal(math.log(60), 0.8))))
    times = np.sort(rng.uniform(0.0, HISTORY_HOURS, count))
    hour = times % 24
    features = np.stack([rng.normal(0.0, 1.0, count), rng.uniform(0.0, 1.0, count),
                         (rng.random(count) < 0.3).astype(float),
                         np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24)], axis=1)
    p = 1.0 / (1.0 + np.exp(-(bias + features @ weights)))
    clicked = rng.random(count) < p
    impressions = [{"features": [float(v) for v in f], "clicked": bool(c), "time": float(t)}
                   for f, c, t in zip(features, clicked, times)]
    return Device(device_id, impressions, _states(rng))


@toolbox
def make_population(num_devices: int = 400, num_held_out: int = 100, seed: int = 0) -> Population:
    """``num_devices`` training devices (ids 0, 1, ...) and ``num_held_out`` held-out devices
    (ids from ``num_devices`` on), every one drawn from its own seeded stream: the same seed
    gives the same population, and a bigger population keeps the first devices' data; the
    held-out devices do not depend on ``num_devices``, so evaluations compare across sizes."""
    if num_devices < 1 or num_held_out < 1:
        raise ValueError("need at least one training and one held-out device")
    training, evaluation = np.random.SeedSequence(seed).spawn(2)
    devices = [_device(i, np.random.default_rng(stream)) for i, stream in enumerate(training.spawn(num_devices))]
    held_out = [_device(num_devices + j, np.random.default_rng(stream))
                for j, stream in enumerate(evaluation.spawn(num_held_out))]
    return Population(devices, held_out, seed)


@toolbox
def initial_state() -> dict[str, torch.Tensor]:
    """The triggering model before training: all zeros (it predicts 0.5 for everything)."""
    return {"weight": torch.zeros(NUM_FEATURES), "bias": torch.zeros(1)}


@toolbox
def click_probability(state, features) -> torch.Tensor:
    """The triggering model's click probability for each row of ``features`` (n, 5)."""
    features = torch.as_tensor(features, dtype=torch.float32)
    return torch.sigmoid(features @ state["weight"].float() + state["bias"].float())


@toolbox
def as_tensors(impressions) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (n, 5) float32, clicked (n,) float32) of a list of impression dicts."""
    if not impressions:
        return torch.zeros(0, NUM_FEATURES), torch.zeros(0)
    features = torch.tensor([r["features"] for r in impressions], dtype=torch.float32)
    clicked = torch.tensor([float(r["clicked"]) for r in impressions], dtype=torch.float32)
    return features, clicked
