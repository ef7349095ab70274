"""`blindinfer convert SOURCE --out DIR [--precision int4|fp32]`: a GGUF file or a Hugging
Face model folder to an onnxruntime-genai model folder, on this machine, offline.

Only argparse here: the work (and its heavy, optional imports) is in
blindinfer.client.convert, imported when the command runs, so `blindinfer --help` and the
other commands work where the `convert` extra is not installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HELP = "convert a GGUF file or a Hugging Face model folder for generative serving"
DESCRIPTION = (
    "Convert a GGUF file or a Hugging Face model folder (config.json, weights, tokenizer) "
    "into an onnxruntime-genai model folder (genai_config.json, model.onnx, tokenizer files "
    "with the chat template) with onnxruntime-genai's model builder, on this machine and "
    "offline: nothing is fetched from a model hub. Needs the extra: "
    "pip install 'blindinfer[convert]'. A GGUF is dequantized to fp32 first, then built at "
    "--precision."
)
EPILOG = (
    "Exit status: 0 converted; 1 the builder failed on this model; 2 usage error (missing or "
    "unusable source, --out not empty, the extra not installed); 130 interrupted."
)


def add_command(
    commands: Any, command: Callable[..., argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Registers `convert` with main's `_command` factory (shared --debug and layout)."""
    parser = command(commands, "convert", HELP, DESCRIPTION, EPILOG)
    parser.add_argument(
        "model_source", metavar="SOURCE", type=Path, help="a .gguf file or a model folder"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="new (or empty) folder for the converted model"
    )
    parser.add_argument(
        "--precision",
        choices=("int4", "fp32"),
        default="int4",
        help="weights of the built model: int4 (small, fast on CPU) or fp32 (exact)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show the builder's own output as it runs"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from blindinfer.client.convert import convert

    def say(text: str) -> None:
        print(f"blindinfer convert: {text}", file=sys.stderr, flush=True)

    convert(
        args.model_source,
        args.out,
        precision=args.precision,
        verbose=bool(args.verbose),
        progress=say,
    )
    return 0
