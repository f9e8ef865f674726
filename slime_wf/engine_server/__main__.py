"""`python -m slime_wf.engine_server --model-path DIR ...`: the flags are in `args`."""

import os

# The engine's OpenMP threads sleep between parallel regions instead of spinning (unless the caller
# chose otherwise; libgomp reads this when torch loads it, so before the import below). The engine
# alternates short tensor ops with Python work, and spinning threads took the cores that the campaign's
# other processes on the same machine need meanwhile (the rollout loop, reward workers, a Prefect
# server): tiny-math flow 0.42 -> 0.34 and 0.43 -> 0.28 s per rollout id, the plain loop unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from slime_wf.engine_server.server import main

if __name__ == "__main__":
    main()
