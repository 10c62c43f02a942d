"""PNG figures. Every module here draws with matplotlib's Agg backend (no display needed), set
once on import of the package; plots.save writes a figure."""

import matplotlib

matplotlib.use("Agg")
