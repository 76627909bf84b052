"""`python -m waystation`: the same as the `waystation` command."""

from waystation.cli import main

raise SystemExit(main())
