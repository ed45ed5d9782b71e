"""``python -m cbam_viz ...``: see :mod:`cbam_viz.cli`."""
from cbam_viz.cli import main

raise SystemExit(main())
