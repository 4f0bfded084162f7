"""Members whose tensors live in external-data files: those files are checksummed in the
manifest like the graphs, and what was hashed is what ONNX Runtime loads (from memory: no file
is opened again between the check and the load, and none the manifest does not list is read)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.external_data_helper import convert_model_to_external_data

from snapserve.server.engine import runtime
from tests.support.calls import digits_input, native_predict, native_stub
from tests.support.models import (DIGITS_CLASSES, DIGITS_SHAPE, random_members,
                                  reference_member_probs, write_model_version)
from tests.support.servers import serving


def _externalise_first_member(version: Path, listed: bool = True) -> Path:
    """Rewrite members/member-000.onnx with its tensors in member-000.onnx.data."""
    manifest = json.loads((version / "manifest.json").read_text())
    model = onnx.load(version / "members" / "member-000.onnx")
    convert_model_to_external_data(model, all_tensors_to_one_file=True,
                                   location="member-000.onnx.data", size_threshold=0)
    onnx.save_model(model, version / "members" / "member-000.onnx")
    data = version / "members" / "member-000.onnx.data"
    graph = (version / "members" / "member-000.onnx").read_bytes()
    manifest["members"][0]["sha256"] = hashlib.sha256(graph).hexdigest()
    if listed:
        manifest["members"][0]["external_data"] = [
            {"file": "members/member-000.onnx.data",
             "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}]
    (version / "manifest.json").write_text(json.dumps(manifest))
    return data


def _version(repo: Path) -> Path:
    return write_model_version(repo, "digits", random_members(2, 16, 5, seed=3), DIGITS_SHAPE,
                               DIGITS_CLASSES)


async def test_external_data_is_checked_and_loaded_from_the_checked_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    version = _version(tmp_path)
    reference = reference_member_probs(version, digits_input(3)).mean(axis=1)
    _externalise_first_member(version)
    loaded_from: list[type] = []
    session = runtime.ort.InferenceSession

    def spy(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        loaded_from.append(type(model))
        return session(model, *args, **kwargs)

    monkeypatch.setattr(runtime.ort, "InferenceSession", spy)
    async with serving(tmp_path) as running:
        async with native_stub(running) as stub:
            scores = await native_predict(stub, digits_input(3))
    np.testing.assert_allclose(scores["probabilities"], reference, rtol=1e-5, atol=1e-6)
    assert loaded_from and set(loaded_from) == {bytes}  # never a path: nothing re-opened


@pytest.mark.parametrize("fault, says", [
    ("altered", "external data file 'members/member-000.onnx.data' of member"),
    # Lying next to the graph but not in the manifest: not read (before: loaded unchecked).
    ("unlisted", "ONNX Runtime cannot load it"),
])
async def test_a_bad_or_unlisted_external_data_file_refuses_the_version(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str, says: str) -> None:
    good = _version(tmp_path)  # version 1 stays good
    broken = _version(tmp_path)
    data = _externalise_first_member(broken, listed=fault != "unlisted")
    if fault == "altered":
        data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with caplog.at_level(logging.ERROR, logger="snapserve"):
        async with serving(tmp_path) as running:
            assert running.registry.versions("digits") == [int(good.name)]
    refusal = [r.getMessage() for r in caplog.records if "refusing model digits version 2" in
               r.getMessage()]
    assert refusal and says in refusal[0], refusal or [r.getMessage() for r in caplog.records]
