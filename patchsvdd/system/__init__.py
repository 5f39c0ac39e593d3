"""Processes and network: TCP probes, the TLS check, certificates, the envoy supervisor, config checks, the local
federation harness, test hosts in network namespaces and a delaying TCP relay."""
