"""fedcourse: the support library every lesson of Private Federated Learning imports.

Modules, by what a lesson needs:

- ``fedcourse.mnist``        MNIST: IDX reader, the embedded sample and the full download
- ``fedcourse.partition``    splitting a data set across clients (IID, shards, Dirichlet, quantity skew)
- ``fedcourse.models``       the course's models (PyTorch's MNIST example CNN, McMahan CNN and 2NN, logistic regression)
- ``fedcourse.training``     seeding, device choice, train and evaluate loops
- ``fedcourse.plots``        the plots lessons share
- ``fedcourse.environment``  the environment report lesson 00 prints
- ``fedcourse.aggregation``  reference implementations of aggregation steps (lesson 00 onwards)
- ``fedcourse.pointers``     reference mini-PySyft: workers, pointer tensors, remote ops and autograd, model send/get (lesson 01)
- ``fedcourse.federated_data`` federated data sets, the federated data loader and the send-train-get step (lesson 02)
- ``fedcourse.syft_compat``  the PySyft 0.2 names (``from fedcourse import syft_compat as sy``) over pointers and federated data;
                             PySyft 0.2's tutorials Parts 01-04, 06 and 07 run on it (``tools/run_pysyft_tutorials.py``)
- ``fedcourse.fedavg``       Federated Averaging: ClientUpdate, weighted average, sampling, dropout, server loop (lesson 03 onwards)
- ``fedcourse.compression``  compressed uplinks: bit packing, quantization, rotation, subsampling, low rank, compressed rounds (lesson 04 onwards)
- ``fedcourse.leakage``      gradient-leakage attacks: iDLG label inference, Deep Leakage from Gradients, PSNR/SSIM, matching (lesson 05 onwards)
- ``fedcourse.paillier``     Paillier-encrypted aggregation with phe: fixed point mod n, packing, encrypted FedAvg (lesson 06 onwards)
- ``fedcourse.secagg``       secure aggregation: fixed point mod 2**b, X25519 pairwise masks, Shamir sharing, the four rounds, SecAgg+ (lesson 07 onwards)
- ``fedcourse.privacy``      DP mechanisms, DP-SGD, an RDP accountant, DP-FedAvg (lesson 08 onwards)
- ``fedcourse.suggestions``  a simulated population of phones showing query suggestions: impressions, device states, held-out phones (lesson 10)
- ``fedcourse.fl_system``    a Gboard-style private federated system: SQLite training cache, eligibility and over-selection, checkpoints, private rounds, evaluation, the driver (lesson 10)
- ``fedcourse.frameworks``   the course's FedAvg in TensorFlow Federated and Flower: batches, weights, apps (lesson 11)

Lessons import the submodule they need, e.g. ``from fedcourse.mnist import load_mnist``.
"""

__version__ = "0.1.0"
