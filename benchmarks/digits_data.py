"""A second set of real images in Products-10K's layout: scikit-learn's handwritten digits.

1,797 real scans (8 x 8, 16 grey levels) of 10 digits, which install with the project: each digit
is a "SKU", upscaled to 64 x 64 JPEG. Training counts fall off as 150 / rank (150, 75, 50, ... 15
images: a long tail, as Products-10K's), the test set is balanced (25 per digit, 40% of them
Public), and test names are 7-digit ids as on Kaggle. The folder is a ``data.source: dir`` source:

    python benchmarks/digits_data.py /tmp/digits
    dvc exp run -S data.source=dir -S data.dir=/tmp/digits

benchmarks/bench_cv.py runs the pipeline on it (docs/pipeline.md, K-fold cross-validation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

#: training images of the digit ranked r (0 = the head): HEAD / (r + 1)
HEAD, TEST_PER_DIGIT, SIZE = 150, 25, 64


def write_digits(dest: Path, seed: int = 0) -> dict:
    """Write train/, test/, train.csv and test_kaggletest.csv under ``dest``; return the counts."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(10)  # which digit is the head, which the tail
    (dest / "train").mkdir(parents=True, exist_ok=True)
    (dest / "test").mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == digit))
        n_train = HEAD // (int(ranks[digit]) + 1)
        for split, part in (
            ("test", idx[:TEST_PER_DIGIT]),
            ("train", idx[TEST_PER_DIGIT : TEST_PER_DIGIT + n_train]),
        ):
            for i in part:
                image = cv2.resize(
                    (digits.images[i] * 255 / 16).astype(np.uint8),
                    (SIZE, SIZE),
                    interpolation=cv2.INTER_CUBIC,
                )
                if split == "train":
                    name = f"{len(train_rows) + 1}.jpg"
                    train_rows.append({"name": name, "class": 5000 + digit, "group": digit % 2})
                else:
                    name = f"{4700000 + len(test_rows)}.jpg"
                    usage = "Public" if len(test_rows) % 5 < 2 else "Private"
                    test_rows.append({"name": name, "class": 5000 + digit, "Usage": usage})
                cv2.imwrite(
                    str(dest / split / name),
                    cv2.cvtColor(image, cv2.COLOR_GRAY2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95],
                )
    pd.DataFrame(train_rows).to_csv(dest / "train.csv", index=False)
    pd.DataFrame(test_rows).to_csv(dest / "test_kaggletest.csv", index=False)
    return {"train": len(train_rows), "test": len(test_rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    print(write_digits(args.dest))


if __name__ == "__main__":
    main()
