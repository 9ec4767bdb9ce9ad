"""``syft.frameworks.torch``: federated learning tools (``frameworks.torch.fl``)."""
