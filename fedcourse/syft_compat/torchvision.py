"""An offline stand-in for ``from torchvision import datasets, transforms`` in PySyft 0.2 code.

The tutorials load MNIST with torchvision, which downloads it. The course runs offline on its
embedded sample, so this module offers the few names that code uses, with the same behaviour
on the course's data::

    from fedcourse.syft_compat.torchvision import datasets, transforms   # was: from torchvision import ...

    train = datasets.MNIST("../data", train=True, download=True,
                           transform=transforms.Compose([transforms.ToTensor(),
                                                         transforms.Normalize((0.1307,), (0.3081,))]))
    train.federate((bob, alice))

``datasets.MNIST`` is a ``torch.utils.data.Dataset`` like torchvision's: ``data`` (uint8,
``(N, 28, 28)``), ``targets`` (int64), and items ``(transform(image), target)``, where the image
is a PIL image (as in torchvision) when Pillow is installed. Its digits are the course's
embedded sample (``fedcourse.mnist``): 7,997 training and 2,003 test digits taken from the
original MNIST test set, not the 60,000/10,000 of the full download. ``root`` and
``download`` are accepted and ignored: nothing is downloaded or written. The first use prints
a note saying so. For the full data set use ``fedcourse.mnist.load_mnist(split, source="full")``.
"""

from __future__ import annotations

import types

import numpy as np
import torch
from torch.utils.data import Dataset

from fedcourse.mnist import sample_arrays, sample_split_indices

__all__ = ["datasets", "transforms", "MNIST", "Compose", "ToTensor", "Normalize", "Lambda"]

_NOTED = {"done": False}


class MNIST(Dataset):
    """``datasets.MNIST(root, train=True, transform=None, target_transform=None, download=False)``
    on the course's embedded sample (no download; see the module's docstring)."""

    classes = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
               "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"]

    def __init__(self, root=None, train: bool = True, transform=None, target_transform=None,
                 download: bool = False) -> None:
        images, labels = sample_arrays()
        train_idx, test_idx = sample_split_indices()
        index = train_idx if train else test_idx
        self.root = root
        self.train = train
        self.transform = transform
        self.target_transform = target_transform
        self.data = torch.from_numpy(np.ascontiguousarray(images[index]))
        self.targets = torch.from_numpy(labels[index].astype(np.int64))
        if not _NOTED["done"]:
            _NOTED["done"] = True
            print("Note: datasets.MNIST here is the course's embedded MNIST sample (7,997 training and "
                  "2,003 test digits of the original MNIST test set); nothing is downloaded.")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        image, target = self.data[index].numpy(), int(self.targets[index])
        try:
            from PIL import Image
        except ImportError:  # without Pillow the transform receives the uint8 array
            pass
        else:
            image = Image.fromarray(image)  # a 2-D uint8 array makes a grey-scale ("L") image
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self) -> str:
        split = "Train" if self.train else "Test"
        return (f"Dataset MNIST (the course's embedded sample, no download)\n    Number of datapoints: {len(self)}\n"
                f"    Split: {split}")


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms) -> None:
        self.transforms = list(transforms)

    def __call__(self, value):
        for transform in self.transforms:
            value = transform(value)
        return value


class ToTensor:
    """A PIL image or an ``(H, W[, C])`` uint8 array -> a float tensor ``(C, H, W)`` in [0, 1]."""

    def __call__(self, picture) -> torch.Tensor:
        if isinstance(picture, torch.Tensor):
            array = picture.numpy()
        else:
            array = np.asarray(picture)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(np.array(array.transpose(2, 0, 1)))  # a writable copy
        if tensor.dtype == torch.uint8:
            return tensor.float().div_(255.0)
        return tensor.float()


class Normalize:
    """``(x - mean) / std`` per channel, on a float tensor ``(C, H, W)``."""

    def __init__(self, mean, std) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std


class Lambda:
    """Apply a function."""

    def __init__(self, function) -> None:
        self.function = function

    def __call__(self, value):
        return self.function(value)


datasets = types.SimpleNamespace(MNIST=MNIST)
transforms = types.SimpleNamespace(Compose=Compose, ToTensor=ToTensor, Normalize=Normalize, Lambda=Lambda)
