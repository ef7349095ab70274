"""Intel SGX and TDX DCAP quotes: parsers, dcap-qvl verification against the pinned root,
PCCS collateral, and the [sgx] / [tdx] policy sections."""
