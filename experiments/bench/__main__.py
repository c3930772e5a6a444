"""``python -m experiments.bench``: :func:`experiments.bench.throughput.main`."""

import sys

from experiments.bench.throughput import main

if __name__ == "__main__":
    sys.exit(main())
