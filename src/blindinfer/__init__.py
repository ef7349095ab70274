"""blindinfer: confidential AI inference with verified remote attestation."""
