"""Run by torchrun in tests/test_parallel.py: rank 1 joins the group, loads its share and dies
while rank 0, running the command line given, waits for it; rank 0 must end in one line."""

import os
import sys
import time

import mistral
from mistral.cli import main

if os.environ["RANK"] == "1":
    mistral.load(None, backend="torch", device="cpu", parallel=sys.argv[-1])
    time.sleep(2)  # rank 0 is in its first transfer by now
    os._exit(3)
sys.exit(main(sys.argv[1:]))
