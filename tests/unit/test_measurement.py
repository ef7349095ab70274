"""The simulated MRENCLAVE: deterministic, sensitive to every source byte and setting,
blind to bytecode caches."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from blindinfer.server.config import Limits, ServerConfig
from blindinfer.tee.measurement import measure, package_root

SETTINGS = ServerConfig().security_relevant()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A private copy of the package sources (other people edit the real tree)."""
    root = tmp_path / "blindinfer"
    shutil.copytree(package_root(), root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def _py_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def test_package_root_is_the_imported_package() -> None:
    root = package_root()
    assert (root / "tee" / "measurement.py").is_file()
    assert (root / "__init__.py").is_file()


def test_measure_is_deterministic(tree: Path, tmp_path: Path) -> None:
    first = measure(SETTINGS, tree)
    assert isinstance(first, bytes)
    assert len(first) == 32
    assert measure(SETTINGS, tree) == first
    assert measure(dict(SETTINGS), tree) == first
    # The location of the tree does not matter, only its content.
    elsewhere = tmp_path / "somewhere" / "else"
    shutil.copytree(tree, elsewhere)
    assert measure(SETTINGS, elsewhere) == first


def test_setting_key_order_does_not_matter(tree: Path) -> None:
    assert measure({"a": 1, "b": {"c": 2, "d": 3}}, tree) == measure(
        {"b": {"d": 3, "c": 2}, "a": 1}, tree
    )


def test_every_byte_of_every_python_file_counts(tree: Path) -> None:
    files = _py_files(tree)
    assert len(files) >= 30
    assert tree / "tee" / "measurement.py" in files
    baseline = measure(SETTINGS, tree)
    seen = {baseline}
    for path in files:
        original = path.read_bytes()
        positions = {0, len(original) // 2, len(original) - 1} if original else set()
        for position in sorted(positions):
            changed = bytearray(original)
            changed[position] ^= 0x01
            path.write_bytes(bytes(changed))
            value = measure(SETTINGS, tree)
            assert value not in seen, f"{path.relative_to(tree)} byte {position}"
            seen.add(value)
        if not original:  # an empty __init__.py: adding a byte must count
            path.write_bytes(b"\n")
            value = measure(SETTINGS, tree)
            assert value not in seen, f"{path.relative_to(tree)} (was empty)"
            seen.add(value)
        path.write_bytes(original)
    assert measure(SETTINGS, tree) == baseline


def test_appending_a_byte_counts(tree: Path) -> None:
    baseline = measure(SETTINGS, tree)
    path = tree / "server" / "app.py"
    path.write_bytes(path.read_bytes() + b"\n")
    assert measure(SETTINGS, tree) != baseline


def test_adding_removing_and_renaming_files_counts(tree: Path) -> None:
    baseline = measure(SETTINGS, tree)
    extra = tree / "store" / "backdoor.py"
    extra.write_text("EVIL = True\n")
    added = measure(SETTINGS, tree)
    assert added != baseline
    extra.unlink()
    assert measure(SETTINGS, tree) == baseline
    (tree / "store" / "names.py").rename(tree / "store" / "names2.py")
    assert measure(SETTINGS, tree) != baseline


def test_moving_content_between_files_counts(tree: Path) -> None:
    # Same concatenated bytes, split differently across two files.
    a, b = tree / "a.py", tree / "b.py"
    a.write_bytes(b"x = 1\n")
    b.write_bytes(b"y = 2\n")
    split_one = measure(SETTINGS, tree)
    a.write_bytes(b"x = 1\ny")
    b.write_bytes(b" = 2\n")
    assert measure(SETTINGS, tree) != split_one


def test_non_python_package_data_counts(tree: Path) -> None:
    baseline = measure(SETTINGS, tree)
    pem = tree / "attestation" / "roots" / "simulation_root.pem"
    pem.write_bytes(pem.read_bytes().replace(b"-----END", b"-----end", 1))
    assert measure(SETTINGS, tree) != baseline


def test_changing_a_setting_changes_the_measurement(tree: Path) -> None:
    baseline = measure(SETTINGS, tree)
    variants = [
        ServerConfig(limits=Limits(max_models=33)),
        ServerConfig(limits=Limits(max_model_bytes=1 << 20)),
        ServerConfig(limits=Limits(max_request_bytes=1 << 20)),
        ServerConfig(isvprodid=2),
        ServerConfig(isvsvn=2),
        ServerConfig(simulate_debug_enclave=True),
    ]
    values = {measure(config.security_relevant(), tree) for config in variants}
    assert baseline not in values
    assert len(values) == len(variants)
    assert measure({}, tree) != baseline
    assert measure({"x": 1}, tree) != measure({"x": "1"}, tree)


def test_settings_that_are_not_security_relevant_do_not_count(tree: Path) -> None:
    baseline = measure(SETTINGS, tree)
    other = ServerConfig(host="0.0.0.0", port=1234, simulation=True)
    assert measure(other.security_relevant(), tree) == baseline


def test_pycache_content_does_not_count(tree: Path) -> None:
    baseline = measure(SETTINGS, tree)
    for directory in (tree, tree / "server", tree / "attestation" / "roots"):
        cache = directory / "__pycache__"
        cache.mkdir(exist_ok=True)
        (cache / "anything.cpython-311.pyc").write_bytes(b"\x00garbage")
        (cache / "notes.py").write_text("even .py files in a cache are ignored\n")
    assert measure(SETTINGS, tree) == baseline
    (tree / "server" / "__pycache__" / "anything.cpython-311.pyc").write_bytes(b"changed")
    assert measure(SETTINGS, tree) == baseline
    (tree / "stray.pyc").write_bytes(b"compiled")
    (tree / "stray.pyo").write_bytes(b"optimised")
    assert measure(SETTINGS, tree) == baseline


def test_default_root_is_the_installed_package() -> None:
    # Only checks that the default is used; the live tree may be edited concurrently.
    value = measure(SETTINGS)
    assert len(value) == 32
