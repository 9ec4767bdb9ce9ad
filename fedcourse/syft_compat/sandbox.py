"""``sy.create_sandbox(globals())``: PySyft 0.2's playground of workers and data, offline.

PySyft 0.2's sandbox hooked torch, made six workers (bob, theo, jason, alice, andy, jon), put
them in the caller's globals with ``hook``, ``workers`` and ``grid``, and dealt seven
scikit-learn data sets out among the workers, each tensor tagged (``"#boston"``, ``"#data"``,
``"#target"`` ...) so that ``grid.search("#boston", "#data")`` finds the parts: a dict from
worker id to a list of pointers.

The course's sandbox does the same with one difference, on purpose: **its data sets are
synthetic stand-ins with the same shapes** (Boston housing: 506 rows of 13 features and a
price-like target; diabetes 442 x 10; breast cancer 569 x 30; digits 1,797 x 64; iris 150 x 4;
wine 178 x 13; Linnerud 20 x 3 with 3 targets). They are generated here from fixed seeds, so
they are the same on every run, and **nothing is downloaded** (the course runs offline, and the
Boston housing data set is no longer distributed by scikit-learn). Their numbers have roughly
the scales of the originals, so that code written for the sandbox behaves alike (a linear model
on the raw Boston-like features starts with losses in the thousands), but no result on them
says anything about the real data. ``create_sandbox`` prints a note saying so.

Each data set is split as PySyft 0.2 split it: ``n // 6`` rows to each of the first five
workers, the rest to the sixth. The parts stay at the workers for the rest of the session (as
in PySyft, dropping the pointers that ``search`` returns does not delete them).
"""

from __future__ import annotations

import torch

from fedcourse.pointers import PointerTensor, VirtualWorker, local_worker

__all__ = ["create_sandbox", "PrivateGridNetwork", "VirtualGrid", "SANDBOX_DATASETS", "WORKER_IDS"]

WORKER_IDS = ("bob", "theo", "jason", "alice", "andy", "jon")

# name: (tags, rows, feature means, feature spreads, target kind, seed). Feature means of the
# Boston-like set follow the column means of the original's published summary.
_BOSTON_MEANS = [3.6, 11.4, 11.1, 0.07, 0.55, 6.3, 68.6, 3.8, 9.5, 408.2, 18.5, 356.7, 12.7]
_BOSTON_SPREADS = [8.6, 23.3, 6.9, 0.25, 0.12, 0.7, 28.1, 2.1, 8.7, 168.5, 2.2, 91.3, 7.1]
SANDBOX_DATASETS = {
    "boston": (("#boston", "#housing", "#boston_housing"), 506, _BOSTON_MEANS, _BOSTON_SPREADS,
               ("regression", 22.5, 9.2), 506013),
    "diabetes": (("#diabetes",), 442, [0.0] * 10, [0.048] * 10, ("regression", 152.1, 77.0), 442010),
    "breast_cancer": (("#breast_cancer_dataset",), 569, [1.0] * 30, [0.5] * 30, ("classes", 2), 569030),
    "digits": (("#digits_dataset",), 1797, [5.0] * 64, [4.0] * 64, ("classes", 10), 1797064),
    "iris": (("#iris_dataset",), 150, [5.8, 3.1, 3.8, 1.2], [0.8, 0.4, 1.8, 0.8], ("classes", 3), 150004),
    "wine": (("#wine_dataset",), 178, [13.0, 2.3, 2.4, 19.5, 99.7, 2.3, 2.0, 0.4, 1.6, 5.1, 1.0, 2.6, 746.9],
             [0.8, 1.1, 0.3, 3.3, 14.3, 0.6, 1.0, 0.1, 0.6, 2.3, 0.2, 0.7, 314.9], ("classes", 3), 178013),
    "linnerud": (("#linnerrud_dataset",), 20, [9.4, 145.6, 70.3], [5.3, 62.6, 51.3], ("regression3", 178.6, 24.7),
                 20003),
}


def synthetic_dataset(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The sandbox's stand-in for a scikit-learn data set: ``(data, target)``, float32, fixed seed."""
    _, rows, means, spreads, kind, seed = SANDBOX_DATASETS[name]
    generator = torch.Generator().manual_seed(seed)
    means, spreads = torch.tensor(means), torch.tensor(spreads)
    if kind[0] == "classes":
        classes = kind[1]
        target = torch.arange(rows) % classes
        target = target[torch.randperm(rows, generator=generator)]
        centres = torch.randn(classes, len(means), generator=generator)
        data = means + spreads * (centres[target] + 0.7 * torch.randn(rows, len(means), generator=generator))
        return data.float(), target.float()
    latent = torch.randn(rows, len(means), generator=generator)
    data = means + spreads * latent
    if name == "boston":
        data = data.clamp_min(0.0)
    weights = torch.randn(len(means), generator=generator)
    signal = latent @ weights / weights.norm()
    noise = 0.35 * torch.randn(rows, generator=generator)
    _, mean, spread = kind
    if kind[0] == "regression3":
        target = torch.stack([mean + spread * (signal * s + noise) for s in (1.0, -0.6, 0.4)], dim=1)
        return data.float(), target.float()
    target = (mean + spread * (signal + noise)).clamp_min(0.0)
    return data.float(), target.float()


class PrivateGridNetwork:
    """The workers of the sandbox, searchable by tags: ``grid.search("#boston", "#data")``."""

    def __init__(self, *workers: VirtualWorker) -> None:
        self.workers = list(workers)
        self._tags: list[tuple[VirtualWorker, int, frozenset]] = []

    def _tag(self, worker: VirtualWorker, obj_id: int, tags) -> None:
        self._tags.append((worker, obj_id, frozenset(tags)))

    def search(self, *query: str) -> dict:
        """``{worker id: [pointer, ...]}`` to the objects that carry every tag in ``query``.

        Workers holding none are left out. The pointers do not delete their objects when they
        are dropped (the data belongs to the workers).
        """
        found: dict = {}
        wanted = set(query)
        for worker in self.workers:
            for holder, obj_id, tags in self._tags:
                if holder is worker and wanted <= tags and obj_id in worker._objects:
                    pointer = PointerTensor(worker, obj_id, local_worker(), garbage_collect_data=False)
                    found.setdefault(worker.id, []).append(pointer)
        return found

    def __repr__(self) -> str:
        return f"<PrivateGridNetwork workers:{[w.id for w in self.workers]}>"


VirtualGrid = PrivateGridNetwork  # the older PySyft 0.2 name


def _deal_out(tensor: torch.Tensor, tags, workers, grid: PrivateGridNetwork) -> None:
    """PySyft 0.2's split: ``n // k`` rows to each worker but the last, the rest to the last."""
    size = tensor.shape[0] // len(workers)
    for index, worker in enumerate(workers):
        stop = None if index == len(workers) - 1 else (index + 1) * size
        pointer = tensor[index * size:stop].clone().send(worker)
        pointer.garbage_collect_data = False  # the part stays at the worker, as in PySyft
        grid._tag(worker, pointer.id_at_location, tags)


def create_sandbox(gbs: dict, verbose: bool = True, download_data: bool = True) -> None:
    """Hook torch, make the six workers and the grid, and deal the data sets out (synthetic, offline).

    Puts ``hook``, ``bob``, ``theo``, ``jason``, ``alice``, ``andy``, ``jon``, ``workers`` and
    ``grid`` into ``gbs`` (pass ``globals()``). ``download_data=False`` makes the workers without
    data, as in PySyft; with ``True`` (the default) nothing is downloaded either: the data sets
    are the synthetic stand-ins described in this module's docstring.
    """
    from fedcourse.syft_compat import TorchHook

    torch_module = gbs.get("torch", gbs.get("th", torch))
    print("Setting up Sandbox...")
    if verbose:
        print("\t- Hooking PyTorch")
    hook = TorchHook(torch_module)
    workers = []
    for worker_id in WORKER_IDS:
        if verbose:
            print(f"\t- Creating Virtual Worker {worker_id}")
        workers.append(VirtualWorker(hook, id=worker_id))
    gbs["hook"] = hook
    gbs.update(zip(WORKER_IDS, workers))
    gbs["workers"] = list(workers)
    grid = PrivateGridNetwork(*workers)
    if download_data:
        print("Note: the course's sandbox holds synthetic stand-ins with the shapes of scikit-learn's data sets "
              "(boston 506x13, diabetes, breast cancer, digits, iris, wine, linnerud), made from fixed seeds; "
              "nothing is downloaded, and results on them say nothing about the real data.")
        for name, (tags, *_rest) in SANDBOX_DATASETS.items():
            if verbose:
                print(f"\t- Dealing out the {name} stand-in")
            data, target = synthetic_dataset(name)
            _deal_out(data, set(tags) | {"#data"}, workers, grid)
            _deal_out(target, set(tags) | {"#target"}, workers, grid)
    gbs["grid"] = grid
    print("Done!")
