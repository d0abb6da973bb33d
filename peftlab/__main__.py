"""`python -m peftlab ...` is the `peftlab` command: what `accelerate launch -m peftlab train RECIPE ...` runs on every rank."""

import sys

from .cli import main

sys.exit(main())
