import os
import sys

from grader.cli import main

try:
    sys.exit(main())
except BrokenPipeError:  # `python -m grader list | head`: the reader stopped; that is not an error
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
