"""Plain-PyTorch references of every op, written for clarity; the tests and benchmarks use them."""
