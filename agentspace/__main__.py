"""``python -m agentspace``: the same CLI as the ``agentspace`` script."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="agentspace")
