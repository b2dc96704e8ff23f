"""`python -m jaxrl_vla.sweep`: N independent agents vmapped in one program (see jaxrl_vla.training.sweep)."""

import sys

from jaxrl_vla.training.sweep import main, run_sweep  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
