import sys

from .runner import main

try:
    sys.exit(main())
except ValueError as err:  # bad options or no such device: one line, not a traceback
    print(f"benchmarks: error: {err}", file=sys.stderr)
    sys.exit(2)
