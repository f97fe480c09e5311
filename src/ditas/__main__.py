"""``python -m ditas ...`` (and ``torchrun -m ditas sample ...``): the ``ditas`` command line."""

import sys

from .cli.main import main

sys.exit(main())
