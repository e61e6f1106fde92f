"""`python -m aniso_fast.models`: list, export and build the shipped models (aniso_fast.store)."""
from .store.models import main

if __name__ == "__main__":
    raise SystemExit(main())
