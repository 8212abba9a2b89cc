"""A worker of the pool: `python -m hbat.trainer.compare prepare|curve ARGS` (hbat.trainer.compare.runner)."""
import sys

from .runner import _worker_main

sys.exit(_worker_main(sys.argv[1], sys.argv[2]))
