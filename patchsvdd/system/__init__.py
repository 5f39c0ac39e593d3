"""What a site or the director runs besides the engine: TCP probes, the TLS check, certificates, the envoy
supervisor, config checks."""
