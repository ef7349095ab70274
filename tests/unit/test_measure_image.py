"""`blindinfer measure --image DIR --platform snp`: image.json parsing and the SNP value.

The SNP value must be exactly what VirTEE's sev-snp-measure prints for the same files and
parameters (issue 10's criterion), and a pinned digest catches a library upgrade that
would silently change it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from blindinfer.cli.main import main
from blindinfer.errors import UsageError
from blindinfer.measure.bootset import load_bootset
from blindinfer.measure.snp import measure_snp
from support.amdsev_firmware import amdsev_firmware

CMDLINE = "console=ttyS0 blindinfer.simulation=1"
# sev-snp-measure 0.0.13 on the files image_dir writes, 1 vCPU EPYC-v4
PINNED_1_VCPU = (
    "bbe5a327b57b6058e23e154c5ec87212d6d9550e714239415d230274728cfd49"
    "e36b9b186a371942db1b11d605c2be5e"
)


def image_dir(root: Path, **manifest_overrides: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "OVMF.amdsev.fd").write_bytes(amdsev_firmware())
    (root / "vmlinuz").write_bytes(b"kernel-" * 1000)
    (root / "initrd.cpio").write_bytes(b"initrd-" * 3000)
    manifest: dict[str, object] = {
        "firmware": "OVMF.amdsev.fd",
        "kernel": "vmlinuz",
        "initrd": "initrd.cpio",
        "cmdline": CMDLINE,
        **manifest_overrides,
    }
    (root / "image.json").write_text(json.dumps(manifest))
    return root


def reference(root: Path, vcpus: int, vcpu_type: str) -> str:
    """What the sev-snp-measure command prints for the same files."""
    tool = Path(sys.executable).with_name("sev-snp-measure")
    out = subprocess.run(
        [
            str(tool),
            "--mode",
            "snp",
            "--vcpus",
            str(vcpus),
            "--vcpu-type",
            vcpu_type,
            "--ovmf",
            str(root / "OVMF.amdsev.fd"),
            "--kernel",
            str(root / "vmlinuz"),
            "--initrd",
            str(root / "initrd.cpio"),
            "--append",
            CMDLINE,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    ("vcpus", "vcpu_type"), [(1, "EPYC-v4"), (4, "EPYC-Milan"), (2, "EPYC-Genoa")]
)
def test_json_equals_sev_snp_measure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], vcpus: int, vcpu_type: str
) -> None:
    root = image_dir(tmp_path / "image")
    code = main(
        [
            "measure",
            "--image",
            str(root),
            "--platform",
            "snp",
            "--vcpus",
            str(vcpus),
            "--vcpu-type",
            vcpu_type,
            "--json",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "platform": "snp",
        "image": str(root),
        "measurement": reference(root, vcpus, vcpu_type),
        "vcpus": vcpus,
        "vcpu_type": vcpu_type,
        "guest_features": 1,
    }


def test_pinned_value(tmp_path: Path) -> None:
    result = measure_snp(load_bootset(image_dir(tmp_path)))
    assert result.measurement.hex() == PINNED_1_VCPU


def test_every_input_changes_the_measurement(tmp_path: Path) -> None:
    base = measure_snp(load_bootset(image_dir(tmp_path / "a"))).measurement
    changed = image_dir(tmp_path / "b", cmdline=CMDLINE + " quiet")
    assert measure_snp(load_bootset(changed)).measurement != base
    kernel = image_dir(tmp_path / "c")
    (kernel / "vmlinuz").write_bytes(b"kernel-" * 1000 + b"!")
    assert measure_snp(load_bootset(kernel)).measurement != base
    initrd = image_dir(tmp_path / "d")
    (initrd / "initrd.cpio").write_bytes(b"x")
    assert measure_snp(load_bootset(initrd)).measurement != base
    firmware = image_dir(tmp_path / "e")
    (firmware / "OVMF.amdsev.fd").write_bytes(amdsev_firmware(fill=0x5B))
    assert measure_snp(load_bootset(firmware)).measurement != base
    assert measure_snp(load_bootset(image_dir(tmp_path / "f")), vcpus=2).measurement != base


def test_toml_output_loads_as_the_snp_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blindinfer.attestation.policy import load_policy

    root = image_dir(tmp_path / "image")
    assert main(["measure", "--image", str(root), "--platform", "snp"]) == 0
    text = capsys.readouterr().out
    assert tomllib.loads(text) == {"snp": {"measurement": [PINNED_1_VCPU]}}
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(text)
    policy = load_policy(policy_file)
    assert policy.snp is not None
    assert policy.snp.measurement == (bytes.fromhex(PINNED_1_VCPU),)


def test_firmware_without_kernel_hashes_is_refused(tmp_path: Path) -> None:
    root = image_dir(tmp_path)
    (root / "OVMF.amdsev.fd").write_bytes(amdsev_firmware(kernel_hashes=False))
    with pytest.raises(UsageError, match="must be an AmdSev OVMF build with SNP_KERNEL_HASHES"):
        measure_snp(load_bootset(root))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kernel": "../vmlinuz"}, "kernel '../vmlinuz' must stay inside the image directory"),
        (
            {"kernel": "/boot/vmlinuz"},
            "kernel '/boot/vmlinuz' must stay inside the image directory",
        ),
        ({"initrd": "missing.cpio"}, "initrd file 'missing.cpio' is missing from"),
        ({"firmware": 7}, "firmware must be a file name relative to the image directory"),
        ({"cmdline": ["a"]}, "cmdline must be a string of at most 4096 bytes"),
        ({"cmdline": "x" * 4097}, "cmdline must be a string of at most 4096 bytes"),
        ({"cmdline": "a\x00b"}, "cmdline contains a NUL byte"),
        ({"extra": 1}, "unknown key(s) extra"),
        (
            {"sha256": {"vmlinuz": "00" * 32}},
            "kernel file vmlinuz does not match the SHA-256 recorded",
        ),
        ({"sha256": {"vmlinuz": "abc"}}, "sha256 must map file names to 64-digit hex digests"),
    ],
)
def test_bad_manifests_are_refused(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    root = image_dir(tmp_path, **overrides)
    with pytest.raises(UsageError) as caught:
        load_bootset(root)
    assert message in str(caught.value)


def test_missing_manifest_and_key(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"has no image\.json: give the directory that"):
        load_bootset(tmp_path)
    root = image_dir(tmp_path / "x")
    (root / "image.json").write_text('{"kernel": "vmlinuz"}')
    with pytest.raises(UsageError, match=r"missing key\(s\) firmware, initrd, cmdline"):
        load_bootset(root)
    (root / "image.json").write_text("{")
    with pytest.raises(UsageError, match="is not valid JSON"):
        load_bootset(root)


def test_recorded_digests_that_match_are_accepted(tmp_path: Path) -> None:
    import hashlib

    root = image_dir(tmp_path / "a")
    digest = hashlib.sha256((root / "vmlinuz").read_bytes()).hexdigest()
    root = image_dir(tmp_path / "b", sha256={"vmlinuz": digest})
    assert load_bootset(root).kernel == root / "vmlinuz"


def test_cli_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = image_dir(tmp_path / "image")
    assert main(["measure", "--image", str(root)]) == 2
    assert "--image needs --platform snp or --platform tdx" in capsys.readouterr().err
    assert main(["measure", "--image", str(tmp_path / "nope"), "--platform", "snp"]) == 2
    assert "does not exist or is not a directory" in capsys.readouterr().err
    assert (
        main(["measure", "--image", str(root), "--platform", "snp", "--vcpu-type", "Skylake"]) == 2
    )
    assert "unknown --vcpu-type 'Skylake'" in capsys.readouterr().err
    assert main(["measure", "--image", str(root), "--platform", "snp", "--vcpus", "0"]) == 2
    assert "--vcpus must be between 1 and 512, got 0" in capsys.readouterr().err


def test_tdx_section_from_an_image_loads_as_the_tdx_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`measure --image --platform tdx` prints what test_measure_tdx checks value by value,
    as a [tdx] section that the client's policy loader takes as it is."""
    from test_measure_tdx import ASSETS, OWN_MRTD_MULTIPAGE_PER_PAGE, RTMR1_AS_GIVEN, RTMR2

    from blindinfer.attestation.intel.tdx_policy import MaskedBytes
    from blindinfer.attestation.policy import load_policy

    root = tmp_path / "image"
    root.mkdir()
    for name in ("tdvf-multipage.fd", "kernel.efi", "initrd.cpio"):
        (root / name).write_bytes((ASSETS / name).read_bytes())
    (root / "OVMF.amdsev.fd").write_bytes(amdsev_firmware())
    manifest = {
        "firmware": "OVMF.amdsev.fd",
        "firmware_tdx": "tdvf-multipage.fd",
        "kernel": "kernel.efi",
        "initrd": "initrd.cpio",
        "cmdline": "console=ttyS0 ro",
    }
    (root / "image.json").write_text(json.dumps(manifest))
    assert main(["measure", "--image", str(root), "--platform", "tdx"]) == 0
    (tmp_path / "policy.toml").write_text(capsys.readouterr().out)
    policy = load_policy(tmp_path / "policy.toml").tdx
    assert policy is not None
    assert [v.hex() for v in policy.mrtd] == [OWN_MRTD_MULTIPAGE_PER_PAGE]
    assert [v.hex() for v in policy.rtmr1] == [RTMR1_AS_GIVEN]
    assert [v.hex() for v in policy.rtmr2] == [RTMR2]
    assert policy.rtmr0 == ()
    # The launch attributes are stated exactly: SEPT_VE_DISABLE (bit 28) alone.
    assert policy.td_attributes == MaskedBytes(bytes.fromhex("0000001000000000"), b"\xff" * 8)
    assert policy.xfam is None  # host-CPU dependent: a comment says how to pin it
    assert "# xfam is not pinned" in (tmp_path / "policy.toml").read_text()
    assert main(["measure", "--image", str(root), "--platform", "tdx", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rtmr0"] is None and printed["td_attributes"] == "0000001000000000"


def test_tdx_needs_a_tdvf_in_the_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = image_dir(tmp_path / "image")
    assert main(["measure", "--image", str(root), "--platform", "tdx"]) == 2
    assert "names no firmware_tdx (TDVF) file" in capsys.readouterr().err


def test_image_build_firmware_must_be_a_boot_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "fw").mkdir()
    (tmp_path / "fw" / "OVMF.amdsev.fd").write_bytes(b"x")
    code = main(["image", "build", "--out", str(tmp_path / "out"), "--firmware",
                 str(tmp_path / "fw")])  # fmt: skip
    assert code == 2
    assert f"--firmware {tmp_path / 'fw'}: no OVMF.inteltdx.fd there" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
