"""fedmem: simulate personalized federated learning and audit what it memorizes."""

__version__ = "0.1.0"
