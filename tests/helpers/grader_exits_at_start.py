"""A grader preload module that ends a worker process while it starts, as a script without a
`__main__` guard does when the worker imports it again: for the grader pool's start check."""

import multiprocessing
import sys

if multiprocessing.current_process().name == "rm-grader":
    sys.exit(3)
