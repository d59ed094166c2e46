"""k-vswitch: Kubernetes networking on Open vSwitch."""

__version__ = "0.1.0"
