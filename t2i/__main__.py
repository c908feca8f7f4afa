"""`python -m t2i ...`: the `t2i` command, where the package is importable but not installed."""
import sys

from t2i.cli import main

if __name__ == "__main__":
    sys.exit(main())
