"""The server options the run measures (one `Plan` per server start), which of them the server
offers, and what its load log and GetModel say about each model against what a plan asked for."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from benchmarks.gpu.config import CUDA_GRAPH_SIZES, ENSEMBLE, FP16, ONE


LOADED = re.compile(r"loaded model (\S+) version (\d+)")
REFUSED = re.compile(r"refusing model (\S+) version (\S+): (.*)")


@dataclass(frozen=True)
class Plan:
    """One server start: its flags, what is swept (all levels, or batch 1 only) and predicted."""

    name: str
    flags: tuple[str, ...]
    sweep: tuple[str, ...] = ()  # models swept at every level
    batch1: tuple[str, ...] = ()  # models measured at concurrency 1 only
    predict: tuple[str, ...] = ()  # models whose answers on test data are checked
    inspect: tuple[str, ...] = ()  # models only loaded and asked for their metadata
    on_cpu: bool = False  # always --device cpu (the CPU comparison)
    cuda_only: bool = False
    needs: tuple[str, ...] = ()  # server flags this plan needs
    expect: dict[str, Any] = field(default_factory=dict)  # graph, cuda_graphs, fp16, io_binding

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.sweep + self.batch1 + self.predict + self.inspect))


def plans(cpu_instances: int) -> list[Plan]:
    """Every option, most important first (a run short of time drops the tail)."""
    graphs = ("--cuda-graph-batch-sizes", CUDA_GRAPH_SIZES)
    return [
        Plan("fused", ("--graph", "fused"), sweep=(ENSEMBLE,), batch1=(ONE,), predict=(ENSEMBLE, FP16),
             needs=("--graph",), expect={"graph": "fused"}),
        Plan("members", ("--graph", "members"), sweep=(ENSEMBLE,), batch1=(ONE,), predict=(ENSEMBLE,),
             needs=("--graph",), expect={"graph": "members"}),
        Plan("fused+cuda-graphs", ("--graph", "fused", *graphs), sweep=(ENSEMBLE,), batch1=(ONE,),
             predict=(ENSEMBLE,), cuda_only=True, needs=("--graph", graphs[0]),
             expect={"graph": "fused", "cuda_graphs": True, "io_binding": "on"}),
        Plan("cpu", ("--graph", "auto", "--instances", str(cpu_instances), "--intra-op-threads", "1"),
             sweep=(ENSEMBLE,), predict=(ENSEMBLE,), on_cpu=True),
        Plan("fp16", ("--graph", "fused", "--precision", "fp16"), sweep=(FP16,), predict=(FP16,),
             needs=("--graph", "--precision"), expect={"graph": "fused", "fp16": True}),
        Plan("fp16+cuda-graphs", ("--graph", "fused", "--precision", "fp16", *graphs), sweep=(FP16,),
             predict=(FP16,), cuda_only=True, needs=("--graph", "--precision", graphs[0]),
             expect={"graph": "fused", "fp16": True, "cuda_graphs": True}),
        Plan("no-io-binding", ("--graph", "fused", "--no-io-binding"), sweep=(ENSEMBLE,), batch1=(ONE,),
             cuda_only=True, needs=("--no-io-binding",), expect={"graph": "fused", "io_binding": "off"}),
        Plan("auto", ("--graph", "auto"), inspect=(ENSEMBLE, ONE), cuda_only=True, needs=("--graph",)),
    ]


def server_flags(help_text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", help_text))


def log_segments(text: str) -> dict[str, list[str]]:
    """The server's load log cut per model: a model's lines end with its 'loaded model' or
    'refusing model' line (models load one after another at start-up)."""
    segments: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        current.append(line)
        match = LOADED.search(line) or REFUSED.search(line)
        if match:
            segments.setdefault(match.group(1), []).extend(current)
            current = []
    return segments


def load_facts(lines: Sequence[str]) -> dict[str, Any]:
    """What the server's log says about one model's load: graph, CUDA graphs, FP16, refusals."""
    text = "\n".join(lines)
    facts: dict[str, Any] = {}
    if match := re.search(r"serving the (\w+) graph on (\d+) instance", text):
        facts["graph_logged"], facts["instances_logged"] = match.group(1), int(match.group(2))
    if "CUDA graphs for batch sizes" in text:
        facts["cuda_graphs"] = True
    if match := re.search(r"no CUDA graphs \((.*)\); running without them", text):
        facts["cuda_graphs"], facts["cuda_graphs_refused"] = False, match.group(1)[:500]
    if "has no FP16 fused graph" in text:
        facts["fp16_missing"] = True
    if match := re.search(r"the fused graph cannot be used \((.*)\)", text):
        facts["fused_refused"] = match.group(1)[:500]
    if match := re.search(r"the fused graph's probabilities differ from the members' by (\S+)", text):
        facts["fused_mismatch"] = match.group(1)  # graph auto then serves the members
    if match := REFUSED.search(text):
        facts["refused"] = match.group(3)[:500]
    return facts


def option_availability(flags: set[str]) -> dict[str, str]:
    """Which of the issue's options the server offers, read off its --help."""
    def have(flag: str, what: str) -> str:
        return f"available ({flag})" if flag in flags else f"not available: no {flag} flag ({what})"

    io = ("available (--no-io-binding)" if "--no-io-binding" in flags else
          "not available as an option: the server has no flag for it; on CUDA it always binds "
          "inputs and outputs (IO binding), so no 'without' can be measured")
    return {"graph": have("--graph", "fused or members"), "io_binding": io,
            "cuda_graphs": have("--cuda-graph-batch-sizes", "CUDA graphs of the fused graph"),
            "fp16": have("--precision", "the FP16 fused graph"),
            "instances": have("--instances", "runtime copies per model")}


def expectation_gaps(plan: Plan, model: str, facts: dict[str, Any]) -> list[str]:
    """Where what the server did differs from what the plan asked for."""
    gaps = []
    runtime = facts.get("runtime", {})
    graph = runtime.get("graph")
    if "graph" in plan.expect and graph != plan.expect["graph"]:
        gaps.append(f"asked for the {plan.expect['graph']} graph, GetModel says {graph!r}"
                    + (f" (fused refused: {facts['fused_refused']})" if "fused_refused" in facts else ""))
    reported = runtime.get("cuda_graphs")  # GetModel: "batch sizes ..." or "off: why"
    if plan.expect.get("cuda_graphs") and reported is not None and not reported.startswith("batch sizes"):
        gaps.append(f"CUDA graphs asked for but not in use: GetModel says {reported!r}")
    elif plan.expect.get("cuda_graphs") and reported is None and facts.get("cuda_graphs") is not True:
        gaps.append("CUDA graphs asked for but not in use: "
                    + facts.get("cuda_graphs_refused", "the log does not say they were captured"))
    binding = runtime.get("io_binding")  # "on", "off: why", or not applicable off CUDA
    asked = plan.expect.get("io_binding")
    if asked is not None and binding is not None and not binding.startswith(asked):
        gaps.append(f"asked for IO binding {asked}, GetModel says {binding!r}")
    if plan.expect.get("fp16") and facts.get("fp16_missing"):
        gaps.append("FP16 asked for, but the version has no FP16 graph: served FP32")
    return gaps
