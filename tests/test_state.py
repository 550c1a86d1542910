"""Pickle-free state files and the artifact manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.state import ArtifactError, load_tree, read_manifest, save_tree, write_manifest


def test_tree_round_trip(tmp_path: Path) -> None:
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "meta": {"n": 3, "names": ["a", "b"]},
            "layers": [np.ones(2), {"b": np.zeros(1, np.int64)}], "x": None, "f": 1.5}
    save_tree(tmp_path / "s.npz", tree)
    back = load_tree(tmp_path / "s.npz")
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert back["w"].dtype == np.float32
    assert back["meta"] == {"n": 3, "names": ["a", "b"]}
    np.testing.assert_array_equal(back["layers"][1]["b"], [0])
    assert back["x"] is None and back["f"] == 1.5


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "evil.npz", __json__=np.frombuffer(b'{"a": {"__ndarray__": "a"}}', np.uint8),
             a=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        load_tree(tmp_path / "evil.npz")


def test_manifest_detects_tampering(tmp_path: Path) -> None:
    save_tree(tmp_path / "det.npz", {"w": np.ones(3)})
    write_manifest(tmp_path, {"input_shape": [3]})
    assert read_manifest(tmp_path)["files"].keys() == {"det.npz"}
    save_tree(tmp_path / "det.npz", {"w": np.zeros(3)})
    with pytest.raises(ArtifactError, match="does not match"):
        read_manifest(tmp_path)
    (tmp_path / "det.npz").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        read_manifest(tmp_path)


def test_missing_manifest_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="inferwatch train"):
        read_manifest(tmp_path)
