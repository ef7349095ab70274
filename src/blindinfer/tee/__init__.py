"""TEE evidence providers (server side): where quotes and sealing keys come from."""
