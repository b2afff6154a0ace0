"""cluster: the CSR approver, bootstrap retirement, node-ready events and GPU bring-up.

No listener of its own: it talks to the cluster's API with the installer's
kubeconfig, or better with the least-privilege ServiceAccount that
`appliance render --as rbac` prints (services/cluster/rbac.py), and is on whenever the
daemon runs (it waits quietly for a cluster).
"""
