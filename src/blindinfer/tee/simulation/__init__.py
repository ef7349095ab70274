"""The simulation TEE: SGX-shaped evidence from a simulated Intel PKI, for development.

INSECURE BY DESIGN. Its private keys ship in `keys/`, so anyone can forge evidence that
chains to the simulation root; clients accept that root only when explicitly asked to.
"""
