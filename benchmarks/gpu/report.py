"""The headline (the fused ensemble against one member at batch 1, the best throughput against
the CPU server's), the summary printed last, and results.md."""

from __future__ import annotations

from typing import Any

from benchmarks.gpu.config import ENSEMBLE, FP16, LATENCY_GOAL, ONE


def _cell(results: dict[str, Any], plan: str, model: str, level: int) -> dict[str, Any] | None:
    entry = (results.get("serve") or {}).get(plan) or {}
    return (((entry.get("models") or {}).get(model) or {}).get("bench") or {}).get(str(level))


def headline(results: dict[str, Any], top: int) -> dict[str, Any]:
    """Batch-1 latency of the fused ensemble against one member (served and in-process), and
    the best throughput at the top concurrency against the CPU server's."""
    device_plans = [p for p, e in (results.get("serve") or {}).items()
                    if e.get("status") == "ok" and e.get("device") == results["device_asked"]
                    and p != "cpu"]
    pairs = {}
    for plan in device_plans:
        ens, one = _cell(results, plan, ENSEMBLE, 1), _cell(results, plan, ONE, 1)
        if ens and one and ens["p50_ms"] and one["p50_ms"]:
            pairs[plan] = {"ensemble_p50_ms": ens["p50_ms"], "one_member_p50_ms": one["p50_ms"],
                           "ratio": ens["p50_ms"] / one["p50_ms"]}
    best: dict[str, Any] = {}
    if pairs:
        ens_plan = min(pairs, key=lambda p: pairs[p]["ensemble_p50_ms"])
        one_plan = min(pairs, key=lambda p: pairs[p]["one_member_p50_ms"])
        ratio = pairs[ens_plan]["ensemble_p50_ms"] / pairs[one_plan]["one_member_p50_ms"]
        best = {"ensemble": {"plan": ens_plan, "p50_ms": pairs[ens_plan]["ensemble_p50_ms"]},
                "one_member": {"plan": one_plan, "p50_ms": pairs[one_plan]["one_member_p50_ms"]},
                "ratio": ratio, "goal": LATENCY_GOAL, "met": ratio <= LATENCY_GOAL}
    throughput = {}
    for plan in device_plans:
        for model in (ENSEMBLE, FP16):
            if cell := _cell(results, plan, model, top):
                throughput[f"{plan}/{model}"] = cell["examples_per_s"]
    cpu = _cell(results, "cpu", ENSEMBLE, top)
    top_entry: dict[str, Any] = {"concurrency": top, "device": throughput,
                                 "cpu": cpu["examples_per_s"] if cpu else None}
    if throughput and cpu and cpu["examples_per_s"]:
        winner = max(throughput, key=throughput.get)  # type: ignore[arg-type]
        top_entry.update(best=winner, ratio_to_cpu=throughput[winner] / cpu["examples_per_s"])
    in_process = (results.get("in_process") or {}).get("batch1_ratio")
    return {"batch1_served": {"per_plan": pairs, "best": best},
            "batch1_in_process_ratio": in_process, "throughput": top_entry}


def summary_lines(results: dict[str, Any]) -> list[str]:
    h = results.get("headline") or {}
    lines = ["", "== summary =="]
    if device := results.get("device"):
        gpu = device.get("gpu")
        lines.append("device: " + (f"{gpu['name']} (driver {gpu.get('driver')}, CUDA {gpu.get('driver_cuda')})"
                                   if gpu else f"{device['cpu']} ({device['cpu_count']} cores)")
                     + f", onnxruntime {device['versions']['onnxruntime']}")
    if t := results.get("train"):
        lines.append(f"train: {t['members_exported']} members, epoch {t['median_epoch_s']} s, "
                     f"{t['steps_per_s']} steps/s, test accuracy {t['test_accuracy']}")
    best = (h.get("batch1_served") or {}).get("best")
    if best:
        lines.append(f"batch 1 served: ensemble {best['ensemble']['p50_ms']:.2f} ms ({best['ensemble']['plan']}) "
                     f"vs one member {best['one_member']['p50_ms']:.2f} ms ({best['one_member']['plan']}): "
                     f"{best['ratio']:.2f}x, goal <= {LATENCY_GOAL} " + ("met" if best["met"] else "NOT met"))
    if ratio := h.get("batch1_in_process_ratio"):
        lines.append("batch 1 in-process ratio: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    top = h.get("throughput") or {}
    if top.get("best"):
        lines.append(f"c={top['concurrency']}: best {top['best']} {top['device'][top['best']]:.0f} ex/s vs "
                     f"cpu {top['cpu']:.0f} ex/s = {top['ratio_to_cpu']:.2f}x")
    for name, entry in (results.get("serve") or {}).items():
        if entry.get("status") != "ok":
            lines.append(f"serve {name}: {entry.get('status')} ({entry.get('reason') or entry.get('error', '')[:120]})")
        for model, facts in (entry.get("models") or {}).items():
            for gap in facts.get("checks") or []:
                lines.append(f"CHECK serve {name}/{model}: {gap}")
    lines.append(f"status {results.get('status')}; {results.get('elapsed_s')} s")
    return lines


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}e}" if 0 < abs(value) < 10 ** -digits else f"{value:.{digits}f}"
    return str(value)


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"# snapserve on {results['device_asked']}: benchmarks/gpu/run.py",
             "", f"Status **{results['status']}**, started {results['started_at']}, "
                 f"{results.get('elapsed_s')} s, {results['mode']} mode."]
    if results.get("error"):
        lines += ["", "```", str(results["error"]), "```"]
    lines += _md_device(results) + _md_train(results) + _md_in_process(results) + _md_serve(results)
    lines += _md_options(results) + _md_errors(results)
    lines += ["", "## Summary", "", "```", *summary_lines(results)[2:], "```"]
    return "\n".join(lines)


def _md_errors(results: dict[str, Any]) -> list[str]:
    errors = {**(results.get("errors") or {}),
              **{f"in-process {k}": v for k, v in ((results.get("in_process") or {}).get("errors") or {}).items()}}
    return ["", "## Errors", "", *(f"- {k}: `{v}`" for k, v in errors.items())] if errors else []


def _md_device(results: dict[str, Any]) -> list[str]:
    device = results.get("device")
    if not device:
        return []
    rows = [("CPU", f"{device['cpu']} ({device['cpu_count']} cores, {device['memory_gib']} GiB)"),
            ("Python", device["python"]), *((k, v) for k, v in device["versions"].items())]
    if gpu := device.get("gpu"):
        rows = [("GPU", f"{gpu['name']} (compute {gpu['capability']}, {gpu['memory_gib']} GiB, "
                        f"{gpu['multiprocessors']} SMs)"),
                ("driver", f"{gpu.get('driver')} (CUDA {gpu.get('driver_cuda')})"),
                ("torch CUDA / cuDNN", f"{gpu['torch_cuda']} / {gpu['cudnn']}"),
                ("clocks, power", f"SM {gpu.get('sm_clock')} of {gpu.get('sm_clock_max')}, "
                                  f"{gpu.get('power')}, {gpu.get('temperature')} C at the start"),
                *rows]
    if ort := device.get("onnxruntime"):
        rows.append(("ORT providers", ", ".join(ort["available"])))
    if install := results.get("install"):
        rows.append(("installed", f"{', '.join(install['wheels']) or '-'}; project: {install.get('project')}"))
    return ["", "## Device", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _md_train(results: dict[str, Any]) -> list[str]:
    t = results.get("train")
    if not t:
        return []
    parity = t["export_parity"]
    return ["", "## Training", "",
            f"ResNet-{results['sizes']['depth']} snapshot ensemble on generated CIFAR-sized data ("
            + ", ".join(f"{n} {k}" for k, n in (t["splits"] or {}).items()) + "), "
            f"device {t['device']}, AMP {t['amp']}, channels_last "
            f"{'default (on for CUDA image inputs)' if t['channels_last'] is None else t['channels_last']}.", "",
            "| epochs | steps/epoch | first epoch s | median epoch s | steps/s | train s | export s | "
            "members | test acc. | export parity |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {t['epochs']} | {t['steps_per_epoch']} | {_fmt(t['first_epoch_s'], 3)} | "
            f"{_fmt(t['median_epoch_s'], 3)} | {_fmt(t['steps_per_s'], 1)} | {_fmt(t['train_seconds'], 1)} | "
            f"{_fmt(t['export_seconds'], 1)} | {t['members_exported']} | {_fmt(t['test_accuracy'], 4)} | "
            f"passed (<= 1e-4; logged max {_fmt(parity['logged_max_abs_diff'])}, "
            f"fused {_fmt(parity['fused_max_abs_diff'])}) |",
            "", f"Wall time of the trainer command: {t['wall_s']} s."]


def _md_in_process(results: dict[str, Any]) -> list[str]:
    r = results.get("in_process")
    if not r:
        return []
    lines = ["", "## ONNX Runtime in-process", "", "Placement (nodes per provider, one profiled run):", "",
             "| graph | session on | nodes | CPU ops |", "|---|---|---|---|"]
    for key, p in r.get("placement", {}).items():
        lines.append(f"| {key} | {p['provider']} | {p['nodes']} | {', '.join(p['cpu_ops']) or '-'} |")
    if r.get("provider_options"):
        opts = r["provider_options"]
        keep = ("cudnn_conv_algo_search", "use_tf32", "do_copy_in_default_stream", "arena_extend_strategy",
                "enable_cuda_graph", "prefer_nhwc", "cudnn_conv_use_max_workspace")
        lines += ["", "CUDA provider options as ONNX Runtime applied them (the server passes only device_id): "
                  + ", ".join(f"`{k}={opts[k]}`" for k in keep if k in opts)]
    lines += ["", f"Parity against {r.get('parity', {}).get('reference', '-')}:", "",
              "| graph | max abs diff of p | top-1 agreement | accuracy |", "|---|---:|---:|---:|"]
    for key, p in r.get("parity", {}).items():
        if isinstance(p, dict):
            lines.append(f"| {key} | {_fmt(p['max_abs_diff'])} | {p['top1_agreement']:.4f} | {p['accuracy']:.4f} |")
    lines += ["", "Latency, median ms (first run in brackets):", "",
              "| graph | batch 1 | batch 32 | batch 1, device-resident | batch 32, device-resident |",
              "|---|---:|---:|---:|---:|"]
    for key, t in r.get("latency_ms", {}).items():
        def cell(batch: str, way: str) -> str:
            v = t.get(batch, {}).get(way)
            return f"{v['median_ms']:.3f} ({v['first_ms']:.1f})" if v else "-"
        lines.append(f"| {key} | {cell('1', 'host')} | {cell('32', 'host')} | "
                     f"{cell('1', 'device_resident')} | {cell('32', 'device_resident')} |")
    return lines


def _md_serve(results: dict[str, Any]) -> list[str]:
    serve = results.get("serve")
    if not serve:
        return []
    levels = results["sizes"]["levels"]
    head = " | ".join(f"c={c} ex/s | c={c} p50 ms" for c in levels)
    lines = ["", "## Served (ensemble-client bench, one example per request)", "",
             f"| option | model | provider | graph | load s | {head} | served |dp| | accuracy | checks |",
             "|---|---|---|---|---:|" + "---:|---:|" * len(levels) + "---:|---:|---|"]
    for name, entry in serve.items():
        if entry.get("status") != "ok":
            reason = entry.get("reason") or entry.get("error", "").splitlines()[0]
            lines.append(f"| {name} | {entry.get('status')}: {reason} |" + " |" * (7 + 2 * len(levels)))
            continue
        for model, f in entry["models"].items():
            bench = f.get("bench") or {}
            cells = " | ".join(f"{_fmt((bench.get(str(c)) or {}).get('examples_per_s'), 0)} | "
                               f"{_fmt((bench.get(str(c)) or {}).get('p50_ms'))}" for c in levels)
            parity = f.get("parity") or {}
            lines.append(f"| {name} | {model} | {f['execution_provider']} | {f['runtime'].get('graph')}"
                         f"{' + CUDA graphs' if f.get('cuda_graphs') else ''} | {entry['load_s']} | {cells} | "
                         f"{_fmt(parity.get('max_abs_diff'))} | {_fmt(parity.get('accuracy'), 4)} | "
                         f"{'; '.join(f.get('checks') or []) or '-'} |")
    return lines


def _md_options(results: dict[str, Any]) -> list[str]:
    options = results.get("options")
    if not options:
        return []
    return ["", "## Options the server offers", "", *(f"- {k}: {v}" for k, v in options.items())]
