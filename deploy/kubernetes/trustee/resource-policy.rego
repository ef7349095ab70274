# Trustee KBS resource policy for blindinfer's store key (an example: merge its rule into
# your KBS's policy; a KBS has one resource policy for all its resources).
#
#   kbs-client --url "$KBS" config --admin-token-file admin-token \
#       set-resource --path blindinfer/store-key/1 --resource-file store-key.bin
#   kbs-client --url "$KBS" config --admin-token-file admin-token \
#       set-resource-policy --policy-file resource-policy.rego
#
# The KBS releases blindinfer/store-key/1 only to a pod VM whose attestation token says:
# the hardware evidence verified, the launch measurement is the pod VM image you accept, and
# the init-data digest is the one of your overlay's init-data (which pins blindinfer's
# image, arguments and the KBS itself). Any other workload, or blindinfer with other
# arguments, gets a refusal from the KBS, and blindinfer then refuses to start.
#
# REPLACE the values below (docs/kubernetes.md, step 2):
#   snp_measurements: the SEV-SNP launch measurement(s) of your Kata pod VM (96 hex);
#   snp_init_data:    `python3 deploy/kubernetes/initdata.py digest overlays/snp/initdata.toml --platform snp`
#   tdx_mr_td:        the TDX MRTD of the pod VM firmware (96 hex);
#   tdx_rtmr1/rtmr2:  its RTMR1 (kernel) and RTMR2 (command line, initrd) values;
#   tdx_init_data:    `... digest overlays/tdx/initdata.toml --platform tdx` (MRCONFIGID).
# Keep the list of a platform empty if you do not run it: an empty list matches nothing.
#
# Input shape, read from confidential-containers/trustee (not copied):
# kbs/sample_policies/default.rego (data.plugin, data["resource-path"]),
# attestation-service/docs/tcb_claims.md and deps/verifier/src/snp/mod.rs,
# deps/verifier/src/tdx/claims.rs (snp.measurement, snp.init_data = HOST_DATA;
# tdx.quote.body.mr_td, rtmr_1, rtmr_2, tdx.init_data = MRCONFIGID; hex strings).
package policy

import rego.v1

default allow := false

store_key_path := ["blindinfer", "store-key", "1"]

snp_measurements := {"REPLACE-96-hex-digits"}
snp_init_data := {"433b7b4e4a94e3c99c7e483a8abdeb0b43781e3ea6b1dd2d623dbee2e5e0c938"}

tdx_mr_td := {"REPLACE-96-hex-digits"}
tdx_rtmr1 := {"REPLACE-96-hex-digits"}
tdx_rtmr2 := {"REPLACE-96-hex-digits"}
tdx_init_data := {"3afc3774f4bcabf912c3b4c7169cf2f5618bd1c1da5cefb208103e8fad6509d900000000000000000000000000000000"}

evidence := input.submods.cpu0["ear.veraison.annotated-evidence"]

allow if {
	data.plugin == "resource"
	data["resource-path"] == store_key_path
	input.submods.cpu0["ear.status"] == "affirming"
	snp_matches
}

allow if {
	data.plugin == "resource"
	data["resource-path"] == store_key_path
	input.submods.cpu0["ear.status"] == "affirming"
	tdx_matches
}

snp_matches if {
	evidence.snp.measurement in snp_measurements
	evidence.snp.init_data in snp_init_data
	evidence.snp.policy_debug_allowed == false
	evidence.snp.policy_migrate_ma == false
}

tdx_matches if {
	evidence.tdx.quote.body.mr_td in tdx_mr_td
	evidence.tdx.quote.body.rtmr_1 in tdx_rtmr1
	evidence.tdx.quote.body.rtmr_2 in tdx_rtmr2
	evidence.tdx.init_data in tdx_init_data
}
