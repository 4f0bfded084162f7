"""Draw the dashboard's disagreement panel from a real run: docs/img/disagreement-panel.png.

A server over a trained `digits` model (`trainer train --dataset digits ...`) answers clean
digits, then digits that drift away from the training data (growing noise, then inverted
images); its /metrics is scraped after every step, and the panel's query, the mean of the
served mutual information and vote disagreement per step (delta of _sum over delta of _count),
is plotted as Grafana would plot it.

    .venv/bin/python scripts/disagreement_panel.py --model-repository models [--out docs/img/...]
"""

from __future__ import annotations

import argparse
import asyncio
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from snapserve.client import AsyncEnsembleClient
from snapserve.server import ServerConfig, start_server

FAMILIES = ("snapserve_served_mutual_information_nats", "snapserve_served_vote_disagreement_ratio")


def digits_images() -> np.ndarray:
    from sklearn.datasets import load_digits  # the train extra
    return load_digits().images[-360:].astype(np.float32)  # [N, 8, 8], values 0..16


def drifted(images: np.ndarray, step: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Clean for the first third, then noise growing to 6 (of 16), then inverted images."""
    third = steps // 3
    if step < third:
        return images
    if step < 2 * third:
        sigma = 6.0 * (step - third + 1) / third
        return np.clip(images + rng.normal(0, sigma, images.shape), 0, 16).astype(np.float32)
    return (16.0 - images).astype(np.float32)


def totals(text: str, model: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name in FAMILIES:
            for s in family.samples:
                if s.labels.get("model") == model and s.name.endswith(("_sum", "_count")):
                    out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def run(repository: Path, model: str, steps: int, requests_per_step: int
              ) -> list[dict[str, float]]:
    running = await start_server(ServerConfig(model_repository=repository, port=0,
                                              metrics_port=0))
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    rng = np.random.default_rng(0)
    images = digits_images()
    samples = []
    try:
        async with AsyncEnsembleClient(f"127.0.0.1:{running.port}") as client:
            for step in range(steps):
                x = drifted(images, step, steps, rng)
                picks = rng.choice(len(x), size=(requests_per_step, 4))
                await asyncio.gather(*(client.predict(model, x[p][:, None], normalize=True)
                                       for p in picks))
                text = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(url, timeout=10).read().decode())
                samples.append(totals(text, model))
    finally:
        await running.stop(None)
    return samples


def per_step_means(samples: list[dict[str, float]], family: str) -> np.ndarray:
    sums = np.array([s[f"{family}_sum"] for s in samples])
    counts = np.array([s[f"{family}_count"] for s in samples])
    return np.diff(sums, prepend=0.0) / np.maximum(np.diff(counts, prepend=0.0), 1)


def plot(samples: list[dict[str, float]], out: Path, requests_per_scrape: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mi, vote = (per_step_means(samples, f) for f in FAMILIES)
    t = np.arange(len(samples))  # one point per scrape, as Grafana draws one per step
    third = len(samples) // 3
    fig, left = plt.subplots(figsize=(9, 3.6), dpi=120)
    right = left.twinx()
    left.plot(t, mi, color="tab:blue", lw=2, label="mean mutual information (nats)")
    right.plot(t, vote, color="tab:orange", lw=2, label="mean vote disagreement (fraction)")
    left.axvspan(t[third], t[2 * third], color="0.9", zorder=0)
    left.axvspan(t[2 * third], t[-1], color="0.8", zorder=0)
    top = max(mi.max(), 1e-3) * 1.15
    for x, text in ((t[0], "clean digits"), (t[third], "noise grows"),
                    (t[2 * third], "inverted images")):
        left.text(x + 0.5, top * 0.93, text, fontsize=9, va="top")
    left.set_ylim(0, top)
    right.set_ylim(0, max(vote.max(), 1e-3) * 1.15)
    left.set_xlabel(f"scrape ({requests_per_scrape} requests of 4 images each between scrapes)")
    left.set_ylabel("nats", color="tab:blue")
    right.set_ylabel("fraction of members", color="tab:orange")
    left.set_title("Mean disagreement of served examples (drift signal)", loc="left", fontsize=11)
    lines = left.get_lines() + right.get_lines()
    left.legend(lines, [line.get_label() for line in lines], loc="center left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}: clean MI {mi[:third].mean():.4f}, noisy {mi[third:2 * third].mean():.4f}, "
          f"inverted {mi[2 * third:].mean():.4f} nats")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--requests-per-step", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("docs/img/disagreement-panel.png"))
    args = parser.parse_args()
    samples = asyncio.run(run(args.model_repository, args.model, args.steps,
                              args.requests_per_step))
    plot(samples, args.out, args.requests_per_step)


if __name__ == "__main__":
    main()
