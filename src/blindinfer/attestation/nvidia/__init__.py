"""NVIDIA H100 confidential-computing evidence: SPDM parser, verifier against the pinned
device root, and the [gpu] policy section."""
