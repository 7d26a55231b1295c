"""``python -m lissa_influence``: the same Hydra app as the ``lissa-influence`` command."""

from .experiments.app import main

if __name__ == "__main__":
    main()
