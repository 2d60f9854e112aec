"""``python -m ordermerge.gpu_slots``: see the package docstring."""

import sys

from ordermerge.gpu_slots.launch import main

sys.exit(main())
