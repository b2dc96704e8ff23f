import os
import tempfile

# Tests compare numbers against NumPy/torch references: use full-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Many tests build a Trainer for the same small problem: share compiled programs
# between them (and with the subprocesses they start) through XLA's disk cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxrl_vla_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

# The test process runs on one CPU device, whatever `python -m jaxrl_vla.train`'s
# auto `trainer.cpu_devices` would pick when a test calls its main() in-process
# (an explicit count is left alone by it). Tests of several devices start a
# subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N.
jax.config.update("jax_num_cpu_devices", 1)
