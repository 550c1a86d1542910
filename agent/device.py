"""Pick the torch device (``auto`` means CUDA when present, else CPU) and size torch's CPU thread pool."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available; use 'auto' or 'cpu'")
    return dev


def configure_cpu_threads(threads: int | None) -> int:
    """Set torch's intra-op threads for the agent's small batched calls; returns the number set.

    A batch of 512 x 64 floats is too small for intra-op parallelism to pay; on
    a busy machine extra torch threads spin against the decoder and the Kafka
    I/O thread for the same cores (measured on 2 cores: drift_vae 7k vs 492k
    records/s, adversarial 2k vs 186k). Scale out with more agent processes in
    the consumer group instead. ``None`` means 1.
    """
    n = threads or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
