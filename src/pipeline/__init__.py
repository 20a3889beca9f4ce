"""Train, track, register and serve small image classifiers."""

__version__ = "0.1.0"
