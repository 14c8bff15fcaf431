"""PyTorch reference implementations (parity tests, `disa-bench --torch`); not installed."""
