"""proxy: the TCP load balancer for the api, machine_config and ingress frontends."""
