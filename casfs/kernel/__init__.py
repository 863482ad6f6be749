"""Kernel serving mode: the image's tree as an EROFS image under overlayfs, file content
from complete objects on the node's disk, and one FUSE view per node behind them for
what the node lacks. See docs/architecture.md, "Kernel serving"."""
