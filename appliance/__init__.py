"""appliance: one daemon that provisions a bare-metal OpenShift/Kubernetes GPU cluster."""

__version__ = "0.1.0"
