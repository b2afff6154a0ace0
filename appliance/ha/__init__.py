"""High availability: leadership of a pair (or more) of appliances through etcd, and the
floating service addresses the leader holds."""
