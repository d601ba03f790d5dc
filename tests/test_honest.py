"""Integrity checks that never pass by leaving something out, and errors that are not swallowed."""

import json

import pytest

from common.evaluation import plotting
from common.training.run_folder import (
    COMPLETE_MARKER,
    RunFolderError,
    _verify_manifest,
    file_sha256,
    hash_parts,
    part_files,
)


def test_a_file_unreadable_at_manifest_time_is_an_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(RunFolderError, match="could not read .*optimizer.pt"):
        hash_parts(tmp_path, ["model.safetensors", "optimizer.pt"])


def test_a_file_missing_at_verification_is_flagged_whatever_its_manifest_recorded(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    # A manifest from before unreadable files were an error could hold null for one.
    manifest = {"model.safetensors": file_sha256(tmp_path / "model.safetensors"), "optimizer.pt": None}
    with pytest.raises(RunFolderError, match="optimizer.pt"):
        _verify_manifest(tmp_path, manifest)
    _verify_manifest(tmp_path, {"model.safetensors": manifest["model.safetensors"]})


def test_a_markers_leftover_temporary_is_not_a_part(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / f".{COMPLETE_MARKER}.x1y2.tmp").write_text(json.dumps({}))
    (tmp_path / COMPLETE_MARKER).write_text(json.dumps({}))
    assert part_files(tmp_path) == ["model.safetensors"]


def test_a_bug_while_plotting_is_logged_as_an_error_with_its_type(tmp_path, monkeypatch, caplog):
    def broken(series):
        raise TypeError("a bug")

    monkeypatch.setattr(plotting, "_build_figure", broken)
    assert plotting.plot_training_curves([{"step": 1, "loss": 1.0}], tmp_path / "curves.png") is None
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and "TypeError: a bug" in errors[0].getMessage() and errors[0].exc_info
