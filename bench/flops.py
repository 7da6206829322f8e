#!/usr/bin/env python
"""Model FLOPs per sample, counted from the layer shapes, and this CPU's measured peak.

    .venv/bin/python bench/flops.py [--json bench/results/flops.json]

Counts the multiply-adds (2 FLOPs each) of every matrix product and attention reduction of SIM,
DIN and DIEN as sim_merlin computes them (default options of ``python -m sim_merlin.fit``: E 16,
two item features, history 100 = 90 long + 10 short, GRU 96, top-k 50), forward; training is
counted as 3x forward (each product's backward pass is two products of the same size).
Element-wise work (activations, masks, softmax) and the optimizer are left out: they cost memory
bandwidth, not FLOPs. The peak is measured: a 2048^3 matrix product in float32 and in bfloat16
(oneDNN), the best this CPU reaches; ``bench/train.py`` divides achieved FLOP/s by it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import ROOT, print_table, write_json


def _mlp(inputs: int, dims, out: int = 1) -> int:
    total, width = 0, inputs
    for d in [*dims, out]:
        total += 2 * width * d
        width = d
    return total


def forward_flops(model_type: str, embedding_dim: int = 16, item_features: int = 2,
                  user_features: int = 1, history: int = 100, long_length: int = 90,
                  top_k: int = 50, gru_units: int | None = None, esu_attention: str = "multihead",
                  esu_heads: int = 4, stage_one=(200,), stage_two=(200, 80), aux=(100, 50),
                  attention_units=(80, 40), reference_compatible: bool = False) -> dict:
    """Forward FLOPs per sample by part (dict), for one model configuration."""
    d = embedding_dim * item_features          # width of an item behaviour
    u = embedding_dim * user_features
    h = gru_units or 6 * embedding_dim
    s = history - long_length
    parts = {}

    def recurrent():
        a1, a2 = attention_units
        parts["gru"] = s * 2 * (d * 3 * h + h * 3 * h)
        parts["dien_attention"] = 2 * d * h + 2 * h * a1 + s * 2 * (2 * h * a1 + a1 * a2 + a2)
        parts["augru"] = s * 2 * (h * 3 * h + h * 2 * h + h * h)
        a1, a2 = aux
        parts["auxiliary"] = (s - 1) * 2 * (h * a1 + 2 * (d * a1 + a1 * a2 + a2))

    if model_type == "din":
        if reference_compatible:  # the reference's dot-product attention
            parts["attention"] = 2 * 2 * history * d
        else:  # DIN's activation unit over every step (first layer split: 2d inputs per step)
            a1, a2 = attention_units
            parts["attention"] = (2 * d * a1 + history * 2 * (2 * d * a1 + a1 * a2 + a2)
                                  + 2 * history * d)
        parts["mlp"] = _mlp(2 * d + u, stage_two)
    elif model_type == "dien":
        if not reference_compatible:  # ours runs over the whole history, the reference's the short
            s = history
        recurrent()
        parts["mlp"] = _mlp(d + h + u, stage_two)
    elif model_type == "sim":
        parts["gsu_attention_and_search"] = 3 * 2 * long_length * d
        parts["stage_one_mlp"] = _mlp(2 * d + u, stage_one)
        attention = "dot" if reference_compatible else esu_attention
        if attention == "dot":
            width = d
            parts["esu"] = 2 * 2 * long_length * d + 2 * long_length * d
        else:
            width = esu_heads * max(1, d // esu_heads)
            parts["esu"] = (2 * d * width + 2 * 2 * long_length * d * width
                            + 2 * 2 * long_length * width + 2 * long_length * d)
        recurrent()
        parts["stage_two_mlp"] = _mlp(width + d + d + h + u, stage_two)
    else:
        raise ValueError(f"unknown model type {model_type!r}")
    return parts


def training_flops(model_type: str, **options) -> int:
    """FLOPs of one sample's forward and backward pass (3 x forward)."""
    return 3 * sum(forward_flops(model_type, **options).values())


def measured_peak(dtype: str, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a size^3 matrix product in ``dtype`` (TensorFlow, oneDNN), best of repeats."""
    import sim_merlin.tf_compat  # noqa: F401
    import tensorflow as tf

    a = tf.cast(tf.random.normal([size, size]), dtype)
    b = tf.cast(tf.random.normal([size, size]), dtype)
    product = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, b)[:1, :1], tf.float32)))
    product().numpy()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        product().numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "flops.json")
    args = parser.parse_args(argv)
    rows, payload = [], {"models": {}, "peak_flops": {}}
    for name, model, options in (("SIM", "sim", {}),
                                 ("SIM reference-compatible", "sim",
                                  {"reference_compatible": True}),
                                 ("DIN", "din", {}),
                                 ("DIN reference-compatible", "din",
                                  {"reference_compatible": True}),
                                 ("DIEN", "dien", {}),
                                 ("DIEN reference-compatible", "dien",
                                  {"reference_compatible": True})):
        parts = forward_flops(model, **options)
        forward = sum(parts.values())
        payload["models"][name] = {"forward": forward, "training": 3 * forward, "parts": parts}
        rows.append([name, f"{forward / 1e6:.2f} M", f"{3 * forward / 1e6:.2f} M",
                     f"{3 * forward * 4096 / 1e9:.1f} G"])
    print_table(["model", "forward/sample", "training/sample", "training/step@4096"], rows)
    for dtype in ("float32", "bfloat16"):
        payload["peak_flops"][dtype] = measured_peak(dtype)
        print(f"measured peak ({dtype} 2048^3 matmul): "
              f"{payload['peak_flops'][dtype] / 1e9:,.0f} GFLOP/s")
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
