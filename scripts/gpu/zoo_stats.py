"""GPU job step: reference statistics of CIFAR-10-JPEG in the zoo classifier's feature space.

    python scripts/gpu/zoo_stats.py --classifier DIR --train .data/cifar10-jpeg-train.npz \
        --test .data/cifar10-jpeg-test.npz --out DIR

Writes OUT/cifar10-features_train.npz and OUT/cifar10-features_test.npz (mu, sigma float64, n) and
OUT/stats.json (the real-data floor: FD of the test split against the train statistics; test
accuracy of the bundled fp16 weights). Features are computed in fp32 with TF32 off.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffquant.data import load_images
from diffquant.evaluation.fid import frechet_distance
from diffquant.zoo.bundle import classifier_features
from diffquant.evaluation.fid import statistics_from_features
from diffquant.zoo.classifier import load_classifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_classifier(a.classifier, a.device)
    res = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"}
    stats = {}
    for split, path in (("train", a.train), ("test", a.test)):
        t0 = time.perf_counter()
        d = load_images(path)
        feats = classifier_features(model, d.images, a.device)
        st = statistics_from_features(feats)
        st.save(out / f"cifar10-features_{split}.npz")
        stats[split] = st
        with torch.no_grad():
            logits = model.head(torch.from_numpy(feats).float().to(a.device)) * model.logit_scale
        acc = float((logits.argmax(1).cpu() == torch.from_numpy(d.labels)).float().mean())
        res[split] = {"n": st.n, "accuracy_fp32": acc, "seconds": round(time.perf_counter() - t0, 2)}
        print(split, res[split], flush=True)
    res["fd_test_vs_train"] = frechet_distance(stats["test"].mu, stats["test"].sigma, stats["train"].mu, stats["train"].sigma)
    print("real-data floor: fd_cifar(test 10k vs train 50k) =", res["fd_test_vs_train"], flush=True)
    (out / "stats.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
