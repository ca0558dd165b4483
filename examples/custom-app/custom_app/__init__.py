"""A Flower app of its own that trains a sparse MLP with FedDST (feddst-flwr's public API)."""
