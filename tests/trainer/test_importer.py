"""`trainer import`: existing ONNX classifiers as a served ensemble, and what it refuses."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from snapserve.client import EnsembleClient
from snapserve.trainer.cli import main as trainer_main
from snapserve.trainer.importer import MemberMismatch, import_members
from tests.support.models import (CLASSES, SHAPE, conv_member, linear_members, member_model,
                                  random_members, reference_member_probs, save)
from tests.support.servers import cpu_server


def test_import_writes_a_servable_version(imported_repo: Path, member_files: list[Path]) -> None:
    version = imported_repo / "mixed" / "1"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["method"] == "imported" and manifest["version"] == 1
    assert manifest["input"] == {"name": "input", "dtype": "float32", "shape": [-1, *SHAPE],
                                 "normalization": None, "kind": "raw"}
    assert manifest["output"] == {"name": "logits", "kind": "logits", "shape": [-1, CLASSES]}
    assert manifest["classes"] == [str(i) for i in range(CLASSES)]
    assert [m["source"] for m in manifest["members"]] == [f.name for f in member_files]
    for member, source in zip(manifest["members"], member_files):  # bytes copied unchanged
        assert (version / member["file"]).read_bytes() == source.read_bytes()
    assert not list((imported_repo / "mixed").glob(".tmp-*"))  # written atomically


def test_imported_ensemble_serves_the_members_mean(served, imported_repo: Path) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(0).normal(0, 2, (5, *SHAPE)).astype(np.float32)
    with EnsembleClient(served.target, timeout=10) as client:
        prediction = client.predict("mixed", x)
    expected = reference_member_probs(imported_repo / "mixed" / "1", x).mean(axis=1)
    np.testing.assert_allclose(prediction.probabilities, expected, rtol=1e-5, atol=1e-6)


def test_class_labels_come_from_the_file(tmp_path: Path, member_files: list[Path]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\nfish\nfrog\n")
    version = import_members(member_files, tmp_path / "repo", "animals", labels, temperature=1.5,
                             normalization={"mean": [0.5], "std": [2.0], "axis": 1})
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog", "bird", "fish", "frog"]
    assert manifest["temperature"] == 1.5 and manifest["input"]["normalization"]["std"] == [2.0]


def test_a_label_file_of_the_wrong_length_is_refused(tmp_path: Path, member_files: list[Path]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    with pytest.raises(MemberMismatch, match="has 2 labels; the members output 5 classes"):
        import_members(member_files, tmp_path / "repo", "x", labels)
    assert not (tmp_path / "repo" / "x" / "1").exists()


def _flat_member() -> onnx.ModelProto:
    """A member taking [batch, 16] instead of [batch, 1, 4, 4]."""
    return member_model(random_members(1, 16, CLASSES)[0], (16,))


def _renamed(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in [*model.graph.input, *model.graph.output]:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    return model


@pytest.mark.parametrize("other, message", [
    (_flat_member(), r"input shape \[-1, 16\] \(the first member has \[-1, 1, 4, 4\]\)"),
    (_renamed(conv_member(2), "input", "x"), r"input name 'x' \(the first member has 'input'\)"),
    (_renamed(conv_member(2), "logits", "scores"), r"output name 'scores'"),
    (conv_member(2, classes=7), r"class count 7 \(the first member has 5\)"),
])
def test_members_that_disagree_are_refused_by_name(tmp_path: Path, other: onnx.ModelProto,
                                                   message: str) -> None:
    files = save([conv_member(1), conv_member(3), other], tmp_path / "onnx")
    with pytest.raises(MemberMismatch, match=rf"member .*member-2.onnx disagrees with .*member-0.onnx: .*{message}"):
        import_members(files, tmp_path / "repo", "bad")
    assert not (tmp_path / "repo" / "bad").exists() or not list((tmp_path / "repo" / "bad").iterdir())


def _graph_with(inputs: list, outputs: list) -> onnx.ModelProto:  # type: ignore[type-arg]
    nodes = [helper.make_node("Identity", [inputs[0].name], [o.name]) for o in outputs]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _vi(name: str, shape: list) -> onnx.ValueInfoProto:  # type: ignore[type-arg]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@pytest.mark.parametrize("model, message", [
    (_graph_with([_vi("input", [1, 5])], [_vi("logits", [1, 5])]), "fixed batch dimension 1"),
    (_graph_with([_vi("input", ["b", 5])], [_vi("logits", ["b", 5]), _vi("extra", ["b", 5])]),
     "has 2 outputs"),
    (_graph_with([_vi("input", ["b", 5]), _vi("mask", ["b", 5])], [_vi("logits", ["b", 5])]),
     "has 2 inputs"),
    (_graph_with([_vi("input", ["b", "n"])], [_vi("logits", ["b", 5])]), "dynamic dimensions after the batch"),
    (_graph_with([_vi("input", ["b", 5, 2])], [_vi("logits", ["b", 5, 2])]), r"expected logits \[batch, classes\]"),
])
def test_members_that_cannot_be_served_are_refused(tmp_path: Path, model: onnx.ModelProto,
                                                   message: str) -> None:
    files = save([model], tmp_path / "onnx")
    with pytest.raises(MemberMismatch, match=message):
        import_members(files, tmp_path / "repo", "bad")


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(MemberMismatch, match="junk.onnx: cannot be read as ONNX"):
        import_members([junk], tmp_path / "repo", "bad")


def test_members_with_external_weights_are_inlined(tmp_path: Path) -> None:
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "big.onnx"
    onnx.save_model(conv_member(1), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="big.weights", size_threshold=0)
    assert (folder / "big.weights").exists()
    version = import_members([path], tmp_path / "repo", "ext")
    member = onnx.load(str(version / "members" / "member-000.onnx"), load_external_data=False)
    assert not any(t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
                   for t in member.graph.initializer)


def _ending_in(model: onnx.ModelProto, *ops: str) -> onnx.ModelProto:
    """`model` with `ops` (each one input, one output) after its logits, under the same output name."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        node.output[:] = ["raw" if o == "logits" else o for o in node.output]
    names = ["raw", *[f"after_{i}" for i in range(len(ops) - 1)], "logits"]
    for op, (src, dst) in zip(ops, zip(names, names[1:])):
        model.graph.node.append(helper.make_node(op, [src], [dst], **({"axis": 1} if op == "Softmax" else {})))
    return model


def _own_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("graph", ["members", "fused"])
def test_probability_outputs_are_served_as_they_are(tmp_path: Path, graph: str) -> None:
    """A final softmax is detected, recorded, and not applied a second time by either graph."""
    files = save([_ending_in(conv_member(1), "Softmax"), _ending_in(linear_members(1, seed=3)[0], "Softmax")],
                 tmp_path / "onnx")
    version = import_members(files, tmp_path / "repo", "p")
    assert json.loads((version / "manifest.json").read_text())["output"]["kind"] == "probabilities"
    x = np.random.default_rng(0).normal(0, 2, (6, *SHAPE)).astype(np.float32)
    own = np.stack([_own_outputs(f, x) for f in files], axis=1)  # [B, M, C], rows summing to one
    server = cpu_server(tmp_path / "repo", graph=graph)
    try:
        with EnsembleClient(server.target, timeout=10) as client:
            prediction = client.predict("p", x, member_probabilities=True)
    finally:
        server.stop()
    np.testing.assert_allclose(prediction.member_probabilities, own, atol=1e-5)
    np.testing.assert_allclose(prediction.probabilities, own.mean(axis=1), atol=1e-5)
    assert prediction.probabilities.max(axis=1).min() > 1.5 / CLASSES  # not the flat 1/C of a double softmax


def test_probabilities_without_a_softmax_node_are_told_by_their_rows(tmp_path: Path) -> None:
    # exp(x) / sum(exp(x)) spelled out: no Softmax node, rows that sum to one
    model = conv_member(2)
    for node in model.graph.node:
        node.output[:] = ["raw" if o == "logits" else o for o in node.output]
    model.graph.node.extend([helper.make_node("Exp", ["raw"], ["e"]),
                             helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=1),
                             helper.make_node("Div", ["e", "s"], ["logits"])])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"))
    version = import_members(save([model], tmp_path / "onnx"), tmp_path / "repo", "p")
    assert json.loads((version / "manifest.json").read_text())["output"]["kind"] == "probabilities"


def test_outputs_that_tell_nothing_need_the_flag(tmp_path: Path) -> None:
    files = save([_ending_in(conv_member(1), "Relu")], tmp_path / "onnx")  # >= 0, rows not summing to 1
    with pytest.raises(MemberMismatch, match="cannot tell whether its outputs are logits or probabilities"
                                             ".*--output-kind logits|probabilities"):
        import_members(files, tmp_path / "repo", "r")
    version = import_members(files, tmp_path / "repo", "r", output_kind="logits")
    assert json.loads((version / "manifest.json").read_text())["output"]["kind"] == "logits"
    assert trainer_main(["-q", "import", "--members", str(files[0]), "--out", str(tmp_path / "repo"),
                         "--name", "r", "--output-kind", "probabilities"]) == 0
    assert json.loads((tmp_path / "repo" / "r" / "2" / "manifest.json").read_text())["output"]["kind"] \
        == "probabilities"


def test_members_of_both_kinds_are_refused(tmp_path: Path) -> None:
    files = save([conv_member(1), _ending_in(conv_member(2), "Softmax")], tmp_path / "onnx")
    with pytest.raises(MemberMismatch, match="member-0.onnx outputs logits, .*member-1.onnx probabilities"):
        import_members(files, tmp_path / "repo", "both")


def test_cli_imports_and_reports_a_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = save([conv_member(1), conv_member(2)], tmp_path / "good")
    assert trainer_main(["-q", "import", "--members", *map(str, good), "--out", str(tmp_path / "repo"),
                         "--name", "cli"]) == 0
    assert "fused graph" in capsys.readouterr().out
    bad = save([conv_member(1), _flat_member()], tmp_path / "bad")
    assert trainer_main(["-q", "import", "--members", *map(str, bad), "--out", str(tmp_path / "repo"),
                         "--name", "cli"]) == 1
    err = capsys.readouterr().err
    assert "member-1.onnx disagrees" in err and "input shape" in err
    assert sorted(p.name for p in (tmp_path / "repo" / "cli").iterdir()) == ["1"]


def test_importing_needs_no_torch() -> None:
    code = ("import sys, trainer.importer, trainer.fuse, onnxruntime.transformers.float16; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0


def test_a_second_import_is_a_new_version(tmp_path: Path) -> None:
    files = save(linear_members(2), tmp_path / "onnx")
    first = import_members(files, tmp_path / "repo", "m")
    second = import_members(files, tmp_path / "repo", "m")
    assert (first.name, second.name) == ("1", "2")
