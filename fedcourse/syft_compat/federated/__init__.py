"""``syft.federated``: what the PySyft 0.2 tutorials import from it (``floptimizer.Optims``)."""
