"""``python -m posttrain`` (and ``accelerate launch -m posttrain train ...``)."""

import sys

from posttrain.cli import main

sys.exit(main())
