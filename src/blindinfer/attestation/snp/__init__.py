"""AMD SEV-SNP attestation reports: parser, verifier against the pinned AMD roots, and the
[snp] policy section."""
