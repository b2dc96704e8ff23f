import os

# Tests compare numbers against NumPy/torch references: use full-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
