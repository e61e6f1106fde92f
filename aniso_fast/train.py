"""`python -m aniso_fast.train`: the training command line (aniso_fast.training)."""
from .training.trainer import main

if __name__ == "__main__":
    raise SystemExit(main())
