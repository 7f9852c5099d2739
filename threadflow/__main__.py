"""``python -m threadflow``: the same command line as the ``threadflow`` script."""

import os
import sys

# ``python -m`` puts the working directory first on sys.path, so that a sqlite_utils.py or
# click.py lying there would be imported in place of the installed package. Moved to the end,
# the directory still serves ``--flow myjobs:Nightly`` for a myjobs.py there, as with the
# ``threadflow`` script. (What the package itself imported before this line, the standard
# library and blinker, Python has already found; ``python -P`` on 3.11+ covers those too.)
if __name__ == "__main__" and sys.path and sys.path[0] in ("", os.getcwd()):
    sys.path.append(sys.path.pop(0))

from .cli import main  # noqa: E402  (after the sys.path change above)

if __name__ == "__main__":
    main()
