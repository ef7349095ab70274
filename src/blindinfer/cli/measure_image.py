"""`blindinfer measure --image DIR --platform snp|tdx`: a policy section made from source.

It prints the section a client's policy loads ([snp] or [tdx]), so the expected values come
from files the user rebuilt (deploy/image/) rather than from what a server says of itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from blindinfer.errors import UsageError
from blindinfer.measure.bootset import BootSet, load_bootset


def add_options(parser: argparse.ArgumentParser) -> None:
    from blindinfer.measure.snp import DEFAULT_VCPU_TYPE, DEFAULT_VCPUS

    group = parser.add_argument_group("measuring a confidential-VM image (--image)")
    group.add_argument(
        "--image",
        metavar="DIR",
        type=Path,
        help="boot set directory with image.json (from `blindinfer image build`); "
        "with --platform snp or tdx, prints the policy section for it",
    )
    group.add_argument(
        "--vcpus",
        type=int,
        default=DEFAULT_VCPUS,
        help="vCPUs the VM is started with (each vCPU's VMSA is measured on SNP)",
    )
    group.add_argument(
        "--vcpu-type",
        default=DEFAULT_VCPU_TYPE,
        help="QEMU CPU model of the SNP guest (sets the measured CPUID signature)",
    )
    group.add_argument(
        "--json", action="store_true", help="print the values as JSON instead of TOML"
    )


def measure_image(args: argparse.Namespace) -> int:
    if args.platform not in ("snp", "tdx"):
        raise UsageError(
            "--image needs --platform snp or --platform tdx (the TEE the image will run on)"
        )
    bootset = load_bootset(args.image)
    values, comments = _snp(bootset, args) if args.platform == "snp" else _tdx(bootset, args)
    if args.json:
        print(json.dumps({"platform": args.platform, "image": str(args.image), **values}))
        return 0
    print(f"# {args.platform} launch values of {args.image}, computed from its files")
    for line in comments:
        print(f"# {line}")
    print(f"[{args.platform}]")
    for key, value in values.items():
        if isinstance(value, str) and len(value) == 96:
            print(f'{key} = ["{value}"]')
        elif key == "td_attributes":  # exact: every bit stated (see measure.tdx)
            print(f'{key} = "{value}"')
    return 0


def _snp(bootset: BootSet, args: argparse.Namespace) -> tuple[dict[str, object], list[str]]:
    from blindinfer.measure.snp import measure_snp

    result = measure_snp(bootset, vcpus=args.vcpus, vcpu_type=args.vcpu_type)
    values: dict[str, object] = {
        "measurement": result.measurement.hex(),
        "vcpus": result.vcpus,
        "vcpu_type": result.vcpu_type,
        "guest_features": result.guest_features,
    }
    comments = [
        f"{result.vcpus} vCPU(s) of type {result.vcpu_type}, guest features "
        f"{result.guest_features:#x}: start the VM with exactly these",
    ]
    return values, comments


def _tdx(bootset: BootSet, args: argparse.Namespace) -> tuple[dict[str, object], list[str]]:
    from blindinfer.measure.tdx import LAUNCH_TD_ATTRIBUTES, XFAM_NOTE, measure_tdx

    if bootset.firmware_tdx is None:
        raise UsageError(
            f"{bootset.directory}/image.json names no firmware_tdx (TDVF) file; "
            "rebuild the image with TDX firmware"
        )
    result = measure_tdx(
        bootset.firmware_tdx.read_bytes(),
        bootset.kernel.read_bytes(),
        bootset.initrd.read_bytes(),
        bootset.cmdline,
    )
    values: dict[str, object] = {"mrtd": result.mrtd.hex()}
    comments: list[str] = []
    if result.rtmr0 is not None:
        values["rtmr0"] = result.rtmr0.hex()
    else:
        values["rtmr0"] = None
        comments.append(f"rtmr0 is not pinned: {result.rtmr0_reason}")
    values["rtmr1"] = result.rtmr1.hex()
    values["rtmr2"] = result.rtmr2.hex()
    values["td_attributes"] = LAUNCH_TD_ATTRIBUTES.hex()
    comments += [
        "td_attributes: launch the TD with SEPT_VE_DISABLE only "
        "(QEMU -object tdx-guest,sept-ve-disable=on), not migratable, no debug",
        XFAM_NOTE,
    ]
    return values, comments


def build_script() -> Path:
    """deploy/image/build.py of the source checkout this package runs from: an image is
    built from committed source, so an installed wheel alone cannot build one."""
    root = Path(__file__).resolve().parents[3]
    script = root / "deploy" / "image" / "build.py"
    if not script.is_file():
        raise UsageError(
            "image build needs a source checkout of blindinfer (deploy/image/build.py); "
            "clone the repository and run it from there"
        )
    return script


def build_image(args: argparse.Namespace) -> int:
    import subprocess
    import sys

    command = [sys.executable, str(build_script()), "--out", str(args.out)]
    if args.cache is not None:
        command += ["--cache", str(args.cache)]
    if args.debian_mirror is not None:
        command += ["--debian-mirror", args.debian_mirror]
    if args.firmware is not None:
        for name in ("OVMF.amdsev.fd", "OVMF.inteltdx.fd"):
            if not (args.firmware / name).is_file():
                raise UsageError(
                    f"--firmware {args.firmware}: no {name} there; give the directory of a "
                    "boot set built before, or leave --firmware out to build the firmware"
                )
        command += ["--firmware", str(args.firmware)]
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise UsageError(f"the image build failed (exit {completed.returncode}); see above")
    return 0
