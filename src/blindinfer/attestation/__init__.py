"""Attestation verification (client side): evidence parsing, chains to pinned roots,
policy. Pure functions of evidence, policy and time; nothing here does I/O."""
