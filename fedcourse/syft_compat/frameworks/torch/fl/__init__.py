"""``from syft.frameworks.torch.fl import ...``: lesson 02's federated data sets and loader."""

from fedcourse.federated_data import BaseDataset, FederatedDataLoader, FederatedDataset
from fedcourse.federated_data import federate as dataset_federate

__all__ = ["BaseDataset", "FederatedDataset", "FederatedDataLoader", "dataset_federate"]
