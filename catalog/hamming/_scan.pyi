# Types of the C extension catalog/hamming/_scan.c (built in place by scripts/build_native.py).
import numpy as np

def within_radius(
    codes: np.ndarray, rows: int, query: np.ndarray, radius: int, found_rows: np.ndarray, found_distances: np.ndarray
) -> int: ...
