"""FedDST: Federated Dynamic Sparse Training on Flower's Message API."""
