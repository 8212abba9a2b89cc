"""``python -m hbat.averaging``: the ``hbat average`` command."""
from .command import main

raise SystemExit(main())
