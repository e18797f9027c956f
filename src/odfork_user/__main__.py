"""python -m odfork_user: the commands (odfork_user.cli)."""

import sys

from odfork_user.cli import main

if __name__ == "__main__":
    sys.exit(main())
