"""Triton python-backend model: the version's fused ensemble.onnx in ONNX Runtime (copied into
the Triton model repository as `<model>/1/model.py` by benchmarks/peers/triton.py; it runs
inside Triton's python backend stub, not in snapserve).

Triton's dynamic batcher hands `execute` the requests of a batch; they are joined with one
concatenate, run once with the same session settings as snapserve's (engine/runtime.py:
sequential, no spinning, full graph optimisation), and cut back per request.
"""

import json
import sys
from pathlib import Path

# The stub's Python does not see the peers venv (PYTHONPATH is not passed on): its site-packages
# (numpy<2, onnxruntime) is named in a file beside this one by benchmarks/peers/triton.py.
sys.path.insert(0, (Path(__file__).parent / "site_packages.txt").read_text().strip())

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402  (provided by the python backend)

OUTPUTS = ["probabilities", "predictive_entropy", "expected_entropy", "mutual_information",
           "vote_disagreement", "member_kl", "member_top_class"]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = int(parameters["intra_op_threads"])
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(parameters["onnx_path"], options,
                                            providers=["CPUExecutionProvider"])
        self.input = config["input"][0]["name"]
        self.feeds = {parameters["temperature_input"]:
                      np.array(float(parameters["temperature"]), dtype=np.float32)}

    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        outputs = self.session.run(OUTPUTS, {self.input: x, **self.feeds})
        responses, start = [], 0
        for part in xs:
            end = start + len(part)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, np.ascontiguousarray(out[start:end]))
                 for name, out in zip(OUTPUTS, outputs)]))
            start = end
        return responses
