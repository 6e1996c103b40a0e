"""``python -m ds_orthoadam.analysis``: the same command as ``ds-orthoadam-analyze``."""
import sys

from ds_orthoadam.analysis.cli import main

sys.exit(main())
