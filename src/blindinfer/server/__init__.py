"""The attested inference server: TLS identity, evidence endpoint, OIP v2 API."""
