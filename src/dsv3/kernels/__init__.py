"""Fast paths (torch ops, cuDNN, Triton). Each has a reference twin in dsv3.model and a parity test."""
