"""`python -m slime_wf.engine_server --model-path DIR ...`: the flags are in `args`."""

from slime_wf.engine_server.server import main

if __name__ == "__main__":
    main()
