"""``python -m threadflow``: the same command line as the ``threadflow`` script."""

from .cli import main

if __name__ == "__main__":
    main()
