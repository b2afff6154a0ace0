"""dns: the cluster's authoritative zones and a guarded forwarder."""
