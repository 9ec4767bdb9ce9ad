"""Lesson 10's hidden tests catch the mistakes issue 16 lists, each in its own cell.

Two planted submissions, graded in the suite's one class run (conftest's ``plant``), carry one
mistake per graded function they touch; everything else is the instructor's answer. Each
test cell builds its inputs with the course's references (``fedcourse.fl_system``,
``fedcourse.suggestions``, ``fedcourse.privacy``), so a mistake costs exactly its own cell:
every other cell of a mistaken submission must still earn full marks. The issue's list, and
where each mistake is planted:

- a cache that keeps expired examples (A) or grows past its cap (B): ``test_cache_limits``;
- a half-written batch after an error, rows committed one by one (B): ``test_cache_bad_records``;
- eligibility that ignores one condition, the unmetered network (A): ``test_eligible_devices``;
- selection that waits for stragglers, a round that ignores the deadline (A): ``test_close_round``;
- noise not scaled to the clip (A): ``test_device_report``;
- an accountant fed the wrong sampling rate, K / population (A): ``test_round_epsilons``;
- evaluation on training devices (A): ``test_federated_evaluation``.

Also planted (B): a fixed-size sample instead of Poisson sampling, a report at the deadline
refused, a pickled checkpoint (whose decoding runs the attacker's code), new weights sent
instead of the update, a float32 report, and a server that divides by the number of reports
instead of the target; (A): NaN for an empty cache, and secure aggregation left at its default
(majority) threshold, which unmasks a sum of fewer than m_min reports. test_private_round runs
with the course's device_report swapped in, so a device_report mistake costs its own cell only. The experiments after the last graded
cell, and the two ungraded measurement cells between the graded ones (the per-row SQLite timing
and the check-in plot), are emptied: they cost time and touch no grade. The control, emptied the
same way, earns full marks, and so does a second control whose every graded function is written
differently from the instructor's.
"""

from __future__ import annotations

import functools

import nbformat
import pytest

from conftest import answered_up_to, assert_cell_lost, assert_full_marks, plant

LESSON = "10-capstone"
LAST_TEST = "test_federated_evaluation"
TESTS = ["test_training_cache", "test_cache_limits", "test_cache_bad_records", "test_eligible_devices",
         "test_select_devices", "test_close_round", "test_checkpoint", "test_train_on_device", "test_device_report",
         "test_private_round", "test_round_epsilons", "test_federated_evaluation"]
# Ungraded code cells between the graded ones that only measure or plot; recognised by their text.
MEASUREMENTS = ("per_row_seconds", "checking_in = [")

# grade_id of a solution cell -> [(what the student got wrong, the test cell it must cost, [(solution text, mistaken text)])]
SUBMISSIONS = {
    "mistakes-a": {
        "training_cache": [("keeps expired examples", "test_cache_limits", [(
            '            self.connection.execute("DELETE FROM impressions WHERE time < ?", (now - self.ttl,))',
            "            pass  # expired impressions stay")])],
        "eligibility": [
            ("lets phones on a metered network check in", "test_eligible_devices",
             [(" and d.states[hour, UNMETERED]]", "]")]),
            ("waits for stragglers: accepts every report that ever arrives", "test_close_round",
             [("for d, t in arrivals.items() if t <= deadline)", "for d, t in arrivals.items() if math.isfinite(t))")]),
        ],
        "train_on_device": [("returns NaN, not a zero update, for an empty cache (divides by the number of examples)",
                             "test_train_on_device", """
def train_on_device(plan, state, features, labels):
    weight, bias = state["weight"].float().clone(), state["bias"].float().clone()
    for _ in range(plan["local_steps"]):
        error = torch.sigmoid(features @ weight + bias) - labels
        weight = weight - plan["learning_rate"] * features.T @ error / len(labels)
        bias = bias - plan["learning_rate"] * error.mean().reshape(1)
    return {"weight": weight - state["weight"], "bias": bias - state["bias"]}
""")],
        "device_report": [("draws noise of z * 2 / sqrt(m_min), not scaled to the clip", "test_device_report", [(
            'share_std = plan["noise_multiplier"] * 2 * clip / math.sqrt(plan["min_reports"])',
            'share_std = plan["noise_multiplier"] * 2 / math.sqrt(plan["min_reports"])')])],
        "private_round": [("lets secure aggregation unmask a sum of fewer than m_min reports (its default threshold)",
                           "test_private_round", [(" threshold=threshold,", "")])],
        "round_epsilons": [("feeds the accountant K / population as the sampling rate", "test_round_epsilons", [(
            'rdp_subsampled_gaussian(plan["selection_rate"],',
            'rdp_subsampled_gaussian(plan["target"] / len(population.devices),')])],
        "federated_evaluation": [("evaluates on the training devices", "test_federated_evaluation", [(
            "for device in population.held_out:", "for device in population.devices:")])],
    },
    "mistakes-b": {
        "training_cache": [
            ("grows past its cap", "test_cache_limits", [(
                '            self.connection.execute("DELETE FROM impressions WHERE id NOT IN "\n'
                '                                    "(SELECT id FROM impressions ORDER BY time DESC, id DESC LIMIT ?)", (self.capacity,))\n',
                "")]),
            ("commits each record as it goes, leaving a half-written batch after a bad record", "test_cache_bad_records", [(
                '            rows.append((float(when), json.dumps(features), int(record["clicked"])))',
                '            with self.connection:\n'
                '                self.connection.execute("INSERT INTO impressions (time, features, clicked) VALUES (?, ?, ?)",\n'
                '                                        (float(when), json.dumps(features), int(record["clicked"])))')]),
        ],
        "eligibility": [
            ("selects a fixed-size sample (not Poisson sampling)", "test_select_devices", [(
                "    keep = torch.rand(len(checked_in), generator=generator) < rate\n"
                "    return [d for d, k in zip(checked_in, keep.tolist()) if k]",
                "    order = torch.randperm(len(checked_in), generator=generator)[:round(rate * len(checked_in))]\n"
                "    return [checked_in[i] for i in order.tolist()]")]),
            ("refuses a report that arrives exactly at the deadline", "test_close_round",
             [("for d, t in arrivals.items() if t <= deadline)", "for d, t in arrivals.items() if t < deadline)")]),
        ],
        "device_report": [("returns a float32 report, not float64", "test_device_report", [(
            "    return clipped + share_std * torch.randn(update.shape, generator=generator, dtype=torch.float64)",
            "    return (clipped + share_std * torch.randn(update.shape, generator=generator, dtype=torch.float64)).float()")])],
        "checkpoint": [("pickles the checkpoint (decoding runs whatever the bytes say)", "test_checkpoint", """
def encode_checkpoint(state):
    return pickle.dumps({k: v.detach().float().numpy() for k, v in state.items()})


def decode_checkpoint(data):
    return {k: torch.from_numpy(v) for k, v in pickle.loads(data).items()}
""")],
        "train_on_device": [("returns the new weights instead of the update", "test_train_on_device", [(
            'return {"weight": (weight - state["weight"]).detach(), "bias": (bias - state["bias"]).detach()}',
            'return {"weight": weight.detach(), "bias": bias.detach()}')])],
        "private_round": [("divides the sum by the number of reports instead of the target", "test_private_round", [(
            '/ plan["target"]', "/ len(result.survivors)")])],
    },
    "control": {},
}


# A second control: every graded function written differently from the instructor's (five REAL
# columns, a cap by rowid, explicit BEGIN/ROLLBACK, numpy's .npz checkpoints, autograd with an
# optimizer, torch.normal noise, compute_epsilon), as a strong student might from the lesson's
# text. It must earn full marks too.
ALTERNATIVE = {
    "training_cache": ("alt", '''
class TrainingCache:
    def __init__(self, path, ttl, capacity):
        self.ttl, self.capacity = ttl, capacity
        self.connection = sqlite3.connect(str(path))
        self.connection.execute("CREATE TABLE IF NOT EXISTS impressions (time REAL, f0 REAL, f1 REAL, f2 REAL, f3 REAL, f4 REAL, clicked INTEGER)")
        self.connection.commit()

    @staticmethod
    def _row(r):
        if not isinstance(r, dict) or sorted(r) != ["clicked", "features", "time"]:
            raise ValueError("bad record")
        try:
            f = np.asarray(r["features"], dtype=float)
        except (TypeError, ValueError):
            raise ValueError("features must be numbers")
        if f.shape != (5,) or not np.isfinite(f).all():
            raise ValueError("features must be 5 finite numbers")
        if r["clicked"] not in (True, False):
            raise ValueError("clicked must be a bool")
        try:
            t = float(r["time"])
        except (TypeError, ValueError):
            raise ValueError("time must be a number")
        if not math.isfinite(t):
            raise ValueError("time must be finite")
        return (t, *f.tolist(), int(r["clicked"]))

    def log(self, impressions):
        rows = [self._row(r) for r in impressions]
        cur = self.connection.cursor()
        try:
            cur.execute("BEGIN")
            cur.executemany("INSERT INTO impressions VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            cur.execute("DELETE FROM impressions WHERE rowid IN (SELECT rowid FROM impressions ORDER BY time DESC LIMIT -1 OFFSET ?)", (self.capacity,))
            self.connection.commit()
        except Exception:
            self.connection.rollback()
            raise

    def examples(self, now):
        self.connection.execute("DELETE FROM impressions WHERE time < ?", (now - self.ttl,))
        self.connection.commit()
        rows = self.connection.execute("SELECT f0, f1, f2, f3, f4, clicked FROM impressions").fetchall()
        a = np.array(rows, dtype=np.float32).reshape(-1, 6)
        return torch.from_numpy(a[:, :5].copy()), torch.from_numpy(a[:, 5].copy())

    def close(self):
        self.connection.close()
    '''),
    "eligibility": ("alt", '''
def eligible_devices(devices, hour):
    return [d.device_id for d in devices if d.states[hour].all()]


def select_devices(checked_in, rate, generator):
    coins = torch.bernoulli(torch.full((len(checked_in),), float(rate)), generator=generator)
    return [checked_in[i] for i in torch.nonzero(coins).flatten().tolist()]


def close_round(arrivals, target, deadline, min_reports):
    order = sorted(arrivals, key=arrivals.get)
    accepted = []
    for d in order:
        if arrivals[d] > deadline or len(accepted) == target:
            break
        accepted.append(d)
    if len(accepted) < min_reports:
        return []
    return accepted
    '''),
    "checkpoint": ("alt", '''
import io, zipfile

def encode_checkpoint(state):
    buffer = io.BytesIO()
    np.savez(buffer, **{k: v.detach().numpy().astype(np.float32) for k, v in state.items()})
    return buffer.getvalue()


def decode_checkpoint(data):
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return {k: torch.from_numpy(arrays[k].astype(np.float32)) for k in arrays.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"not a checkpoint: {error}") from None
    '''),
    "train_on_device": ("alt", '''
def train_on_device(plan, state, features, labels):
    w = state["weight"].clone().requires_grad_(True)
    b = state["bias"].clone().requires_grad_(True)
    if len(labels):
        opt = torch.optim.SGD([w, b], lr=plan["learning_rate"])
        for _ in range(plan["local_steps"]):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy(click_probability({"weight": w, "bias": b}, features), labels).backward()
            opt.step()
    return {"weight": (w - state["weight"]).detach(), "bias": (b - state["bias"]).detach()}
    '''),
    "device_report": ("alt", '''
def device_report(update, plan, generator):
    u = torch.as_tensor(update).double()
    C = plan["clip"]
    u = u / max(1.0, u.norm().item() / C)
    sigma = plan["noise_multiplier"] * 2 * C
    return u + torch.normal(0.0, sigma / plan["min_reports"] ** 0.5, size=u.shape, generator=generator, dtype=torch.float64)
    '''),
    "private_round": ("alt", '''
def private_round(global_state, updates, plan, generator, rng, drop_at=None):
    reports = [device_report(u, plan, generator).numpy() for u in updates]
    sigma = plan["noise_multiplier"] * 2 * plan["clip"]
    t = max(plan["min_reports"], len(reports) // 2 + 1)
    out = secure_sum(reports, clip=plan["clip"] + 8 * sigma / math.sqrt(plan["min_reports"]), value_bits=plan["value_bits"], threshold=t, drop_at=drop_at, rng=rng)
    vec = flatten_update(global_state) + torch.from_numpy(out.total) / plan["target"]
    return unflatten_update(vec), out
    '''),
    "round_epsilons": ("alt", '''
def round_epsilons(plan, rounds, delta):
    return [compute_epsilon(plan["selection_rate"], plan["noise_multiplier"], t, delta) for t in range(1, rounds + 1)]
    '''),
    "federated_evaluation": ("alt", '''
def federated_evaluation(state, population, threshold):
    counts = np.zeros(4)
    for device in population.held_out:
        x, y = as_tensors(device.impressions)
        shown = (click_probability(state, x) >= threshold).float()
        counts += [len(y), y.sum().item(), shown.sum().item(), (shown * y).sum().item()]
    n, clicks, shown, hits = counts
    return {"baseline_ctr": clicks / n, "model_ctr": hits / shown if shown else 0.0, "clicks_kept": hits / clicks, "shown_fraction": shown / n}
    '''),
}


def changes(mistakes: dict) -> dict:
    """grade_id -> (what, change) for answered_up_to: the changes of one cell, applied together."""
    out = {}
    for grade_id, entries in mistakes.items():
        whole = [change for _, _, change in entries if isinstance(change, str)]
        if whole:
            (change,) = whole
            out[grade_id] = (entries[0][0], change)
        else:
            out[grade_id] = ("; ".join(what for what, _, _ in entries), [pair for _, _, pairs in entries for pair in pairs])
    return out


def submission(mistakes: dict) -> nbformat.NotebookNode:
    nb = answered_up_to(LESSON, LAST_TEST, changes(mistakes))
    emptied = 0
    for cell in nb.cells:
        if cell.cell_type == "code" and not cell.metadata.get("nbgrader") and any(m in cell.source for m in MEASUREMENTS):
            cell.source = ""
            emptied += 1
    assert emptied == len(MEASUREMENTS), "the measurement cells to empty were not found; update MEASUREMENTS"
    return nb


STUDENTS = {name: plant(LESSON, name, functools.partial(submission, mistakes)) for name, mistakes in SUBMISSIONS.items()}
ALTERNATIVE_STUDENT = plant(LESSON, "alternative", functools.partial(
    submission, {grade_id: [("written another way", None, answer.strip("\n"))] for grade_id, (_, answer) in ALTERNATIVE.items()}))
LOST = {name: {test: what for entries in mistakes.values() for what, test, _ in entries}
        for name, mistakes in SUBMISSIONS.items()}


def test_every_mistake_the_issue_lists_is_planted():
    planted = {what for lost in LOST.values() for what in lost.values()}
    for phrase in ("expired", "past its cap", "half-written", "metered", "stragglers", "not scaled to the clip",
                   "K / population", "training devices"):
        assert any(phrase in what for what in planted), phrase
    # every graded cell but the basic round trip of the cache (test_training_cache) loses a planted mistake
    assert set(LOST["mistakes-a"]) | set(LOST["mistakes-b"]) == set(TESTS) - {"test_training_cache"}


def test_the_emptied_notebook_with_the_reference_answers_earns_full_marks(planted_grades):
    assert_full_marks(planted_grades, STUDENTS["control"], TESTS)


def test_another_correct_implementation_earns_full_marks(planted_grades):
    assert_full_marks(planted_grades, ALTERNATIVE_STUDENT, TESTS)


@pytest.mark.parametrize("student, test", [(s, t) for s in SUBMISSIONS if s != "control" for t in LOST[s]])
def test_each_planted_mistake_loses_its_cell(planted_grades, student, test):
    assert_cell_lost(planted_grades, STUDENTS[student], test, LOST[student][test])


@pytest.mark.parametrize("student", [s for s in SUBMISSIONS if s != "control"])
def test_a_mistake_costs_only_its_own_cell(planted_grades, student):
    cells = planted_grades.cells(STUDENTS[student])
    kept = {test: cells[test]["score"] for test in TESTS if test not in LOST[student]}
    assert all(cells[test]["score"] == cells[test]["max_score"] > 0 for test in kept), \
        f"{student}: cells without a planted mistake lost points: {kept}"
