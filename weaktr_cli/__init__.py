"""weaktr: WeakTr weakly-supervised semantic segmentation as a command-line toolkit."""

__version__ = "0.1.0"
