"""Weights in Flower records, on the coordinator's side.

The server reads replies and sends weights with these two helpers alone, so
loading the ServerApp never imports the site stack (MONAI, opacus, the data
pipeline); the ClientApp has its own pair.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as a Flower ArrayRecord (C-contiguous copies)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A Flower ArrayRecord as named numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}
