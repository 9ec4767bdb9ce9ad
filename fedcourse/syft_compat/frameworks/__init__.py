"""``syft.frameworks``: the PyTorch part (``frameworks.torch.fl``)."""
