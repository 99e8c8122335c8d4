"""Builders the tests share: a throw-away project for the dvc CLI, tiny prepared datasets written
with the real ShardWriter, a random-weight checkpoint, params files and the stage scripts' mains.

- ``make_project``: a copy of the project as a git repo with one commit (DVC experiments need
  one), so the tests never touch the developer's workspace, cache or dvc.lock.
- ``make_training_data``: each class a coloured shape on a noisy background, so a small model
  learns it in an epoch or two on CPU (train/val/test/label_map/balanced CSVs).
- ``make_eval_data`` / ``make_checkpoint``: four SKUs in two groups, every image a coloured canvas
  with an off-centre bar (crops and flips see different pixels), one test image of a SKU the
  training set lacks (label -1), and a resnet10t checkpoint in products10k.models.checkpoint's
  format.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from products10k.config import PHASES, SECTIONS, apply_overrides, from_dict
from products10k.contracts.shards import ShardWriter
from products10k.models.checkpoint import save_torch
from products10k.models.model import create_model, model_config_dict

# --- a project copy driven by the real dvc CLI ---------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]  # the repository
COPY = ["dvc.yaml", "params.yaml", "stages", "products10k", "presets", ".dvcignore"]
DVC_CONFIG = ROOT / ".dvc" / "config"


def _env() -> dict:
    env = dict(os.environ)
    # Stage commands call `python`/`torchrun`: use the interpreter running the tests.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def run(cwd: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def dvc(cwd: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return run(cwd, sys.executable, "-m", "dvc", *args, **kw)


def deep_update(tree: dict, updates: dict) -> dict:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            deep_update(tree[key], value)
        else:
            tree[key] = value
    return tree


def make_project(dest: Path, params_update: dict | None = None) -> Path:
    """Copy the project into ``dest`` with ``params_update`` merged into params.yaml; git+dvc init."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    deep_update(params, params_update or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    run(dest, "git", "init", "-q")
    # `dvc exp run` commits through pygit2/dulwich, which read the repo config, not GIT_AUTHOR_*:
    # a CI machine without a global git identity still needs one here.
    run(dest, "git", "config", "user.name", "test")
    run(dest, "git", "config", "user.email", "test@example.com")
    dvc(dest, "init", "-q")
    shutil.copy2(DVC_CONFIG, dest / ".dvc" / "config")  # same cache link type as the project
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-q", "-m", "init")
    return dest


# --- a tiny training dataset, its params and the train stage's arguments -------------------------

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 200, 30), (200, 40, 200), (30, 200, 210)]


def _shape_image(label: int, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    colour = COLOURS[label % len(COLOURS)]
    cx, cy = int(w * rng.uniform(0.4, 0.6)), int(h * rng.uniform(0.4, 0.6))
    r = int(min(h, w) * rng.uniform(0.25, 0.35))
    if (label // len(COLOURS)) % 2 == 0:
        cv2.circle(img, (cx, cy), r, colour, -1)
    else:
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
    return img


def make_training_data(
    root: Path,
    num_classes: int = 4,
    train_per_class: int = 8,
    val_per_class: int = 3,
    size: tuple[int, int] = (48, 64),
    seed: int = 0,
) -> Path:
    """Write ``root/{images,train.csv,val.csv,test.csv,label_map.csv,balanced.csv}``; return root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    skus = [1000 + 7 * k for k in range(num_classes)]
    rows = {"train": [], "val": [], "test": []}
    counter = 0
    with ShardWriter(root, shard_mb=0.05) as writer:  # tiny shards: several shards get exercised
        for split, per in (("train", train_per_class), ("val", val_per_class), ("test", val_per_class)):
            for label in range(num_classes):
                for _ in range(per):
                    ok, buf = cv2.imencode(
                        ".jpg", cv2.cvtColor(_shape_image(label, rng, size), cv2.COLOR_RGB2BGR)
                    )
                    assert ok
                    shard, offset, length = writer.add(buf.tobytes())
                    counter += 1
                    rows[split].append(
                        {
                            "name": f"{counter}.jpg",
                            "label": label,
                            "sku": skus[label],
                            "group": label // 2,
                            "domain": "inshop",
                            "shard": shard,
                            "offset": offset,
                            "length": length,
                            "width": size[1],
                            "height": size[0],
                        }
                    )
    for split, data in rows.items():
        df = pd.DataFrame(data)
        if split == "test":
            df["Usage"] = "Public"
        df.to_csv(root / f"{split}.csv", index=False)
    train = pd.DataFrame(rows["train"])
    train.groupby("label").head(3).to_csv(root / "balanced.csv", index=False)
    pd.DataFrame(
        {
            "label": range(num_classes),
            "sku": skus,
            "group": [k // 2 for k in range(num_classes)],
            "n_train": [train_per_class] * num_classes,
        }
    ).to_csv(root / "label_map.csv", index=False)
    return root


TINY_MODEL = {"arch": "resnet10t", "pretrained": False}
# The tiny fixture's training recipe on top of params.yaml's: small and quick, without the
# default's regularisers and warm-up, so that a test sees what it sets and nothing else.
TINY_TRAIN = {
    "seed": 0,
    "epochs": 2,
    "batch_size": 8,
    "resolution": 32,
    "resize": None,
    "lr": 3.0e-3,
    "schedule": "step",
    "warmup_epochs": 0,
    "min_lr": 0.0,
    "color_jitter": 0.0,
    "random_erasing": 0.0,
    "label_smoothing": 0.0,
    "channels_last": False,
    "num_workers": 0,
    "hflip": 0.5,
}
# The finetune sections replace params.yaml's (which hold only what differs from train).
TINY_FINETUNES = {
    "finetune_balanced": {"epochs": 1, "lr": 1.0e-3},
    "finetune_accuracy": {"epochs": 1, "lr": 1.0e-3, "accuracy_loss_weight": 1.0},
}


def params_tree(overrides: dict | None = None) -> dict:
    """The project's params.yaml as a dict, with dotted ``overrides`` (``{"train.lr": 0.1}``) set."""
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    return apply_overrides(tree, overrides or {})


def config(path: str, **overrides):
    """The section at ``path`` (``"train"``, ``"data.synthetic"``) of the project's params.yaml,
    typed, with ``overrides`` of its keys (dotted below it: ``**{"kaggle.timeout_s": 1.0}``)."""
    tree = params_tree({f"{path}.{k}": v for k, v in overrides.items()})
    top, *rest = path.split(".")
    cls, node = SECTIONS[top], tree[top]
    for part in rest:
        cls, node = cls.model_fields[part].annotation, node[part]
    return from_dict(cls, node, prefix=path)


def limits(**overrides):
    """params.yaml's image limits (prepare.max_pixels, max_aspect_ratio, max_file_mb) as the prepare
    stage and an export of the default decode with, with ``overrides`` of ImageLimits' fields."""
    from dataclasses import replace

    from products10k.imaging.images import ImageLimits

    return replace(ImageLimits.from_prepare(config("prepare")), **overrides)


def write_project_params(path: Path, updates: dict) -> Path:
    """The project's params.yaml with the sections of ``updates`` merged key by key, at ``path``."""
    params = deep_update(params_tree(), copy.deepcopy(updates))
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def write_params(path: Path, model: dict | None = None, train: dict | None = None, **sections) -> Path:
    """params.yaml for the tiny fixture: the project's, with the tiny model, train recipe and
    finetunes, then ``model``/``train``/``sections`` merged key by key on top."""
    params = params_tree()
    params.update(copy.deepcopy(TINY_FINETUNES))
    updates = {
        "model": {**TINY_MODEL, **(model or {})},
        "train": {**TINY_TRAIN, **(train or {})},
        # one thread: tests share 2 cores with other tests, and OpenMP barriers stall when oversubscribed
        "dist": {"nproc_per_node": 1, "threads": 1},
    }
    deep_update(params, updates)
    deep_update(params, sections)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def phase_args(data: Path, out: Path, phase: str = "train", csv: str = "train.csv", init: Path | None = None):
    """Command-line arguments of stages/train.py for the fixture dataset."""
    args = [
        "--phase", phase, "--member", "m0",
        "--train-csv", str(data / csv), "--val-csv", str(data / "val.csv"),
        "--label-map", str(data / "label_map.csv"), "--images", str(data),
        "--out", str(out / "models" / phase), "--live", str(out / "dvclive" / phase),
    ]  # fmt: skip
    if init is not None:
        args += ["--init", str(init)]
    return args


def train_phase(params_path, phase: str, member: str, paths, callbacks=None) -> dict:
    """One phase as ``stages/train.py`` runs it: params.yaml read once, the process group around it."""
    from products10k.config.stage import StageParams
    from products10k.training.loop import train_phase as run

    return run(StageParams(params_path).for_member(member), phase, member, paths, callbacks)


def stage_module(name: str):
    """The script ``stages/<name>.py`` as a module (a script, not a package module), for in-process runs."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- a tiny evaluation dataset and a checkpoint ----------------------------------------------------

EVAL_SKUS = [1001, 1002, 2001, 2002]
EVAL_GROUPS = [1, 1, 2, 2]
EVAL_COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def _bar_image(label: int, seed: int, size=(48, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.full((h, w, 3), EVAL_COLOURS[label], dtype=np.uint8)
    img = np.clip(img + rng.integers(-20, 20, size=img.shape), 0, 255).astype(np.uint8)
    x = 5 + 10 * label
    img[:, x : x + 6] = 255  # an off-centre bar: flips and corner crops see different pixels
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def make_eval_data(root: Path) -> Path:
    """Write images/shard-*.bin, train/val/test CSVs and label_map.csv under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "val": [], "test": []}
    counts = {"train": 3, "val": 1, "test": 2}
    seed = 0
    with ShardWriter(root, shard_mb=0.01) as writer:  # tiny shards: reads cross shard files
        for split, n in counts.items():
            for label in range(4):
                for j in range(n):
                    seed += 1
                    shard, offset, length = writer.add(_bar_image(label, seed))
                    rows[split].append(
                        {
                            "name": f"{split}_{label}_{j}.jpg",
                            "label": label,
                            "sku": EVAL_SKUS[label],
                            "group": EVAL_GROUPS[label],
                            "domain": "customer" if j % 2 else "inshop",
                            "shard": shard,
                            "offset": offset,
                            "length": length,
                            "width": 64,
                            "height": 48,
                        }
                    )
        # a test image of a SKU the training set lacks: label -1, always an error
        seed += 1
        shard, offset, length = writer.add(_bar_image(0, seed))
        rows["test"].append(
            {
                "name": "test_unknown.jpg",
                "label": -1,
                "sku": 9999,
                "group": 3,
                "domain": "customer",
                "shard": shard,
                "offset": offset,
                "length": length,
                "width": 64,
                "height": 48,
            }
        )
    for split, data in rows.items():
        df = pd.DataFrame(data)
        if split == "test":
            df["Usage"] = ["Public" if i % 2 else "Private" for i in range(len(df))]
        df.to_csv(root / f"{split}.csv", index=False)
    pd.DataFrame({"label": range(4), "sku": EVAL_SKUS, "group": EVAL_GROUPS, "n_train": [3, 3, 3, 3]}).to_csv(
        root / "label_map.csv", index=False
    )
    return root


def make_checkpoint(
    path: Path, skus=EVAL_SKUS, resolution: int = 32, resize: int | None = None, seed: int = 0
):
    torch.manual_seed(seed)
    cfg = config("model", arch="resnet10t", pretrained=False)
    model = create_model(cfg, len(skus), pretrained=False).eval()
    save_torch(
        path,
        {
            "model": model.state_dict(),
            "model_config": model_config_dict(cfg, len(skus)),
            "labels": list(skus),
            "phase": "train",
            "member": "m0",
            "epoch": 1,
            "resolution": resolution,
            "resize": resize,
            "val_top1": 0.0,
        },
    )
    return model


# --- a tiny raw dataset in the official layout, and prepare settings for it ---------------------

TINY_PREPARE = {
    "size": 48,
    "val_fraction": 0.25,
    "seed": 0,
    "max_bad_fraction": 0.5,
    "jpeg_quality": 90,
    "n_jobs": 1,
}
# SKU -> train images: a long tail with a singleton.
RAW_TRAIN_COUNTS = {101: 6, 102: 4, 103: 3, 204: 2, 205: 1}
RAW_GROUPS = {101: 1, 102: 1, 103: 1, 204: 2, 205: 2}


def jpeg_bytes(color, w=96, h=72, **save_kw) -> bytes:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = color
    img[: h // 2, : w // 2] = 255 - np.asarray(color, np.uint8)  # some structure
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=92, **save_kw)
    return buf.getvalue()


def sku_colour(sku: int) -> tuple[int, int, int]:
    return ((sku * 53) % 256, (sku * 97) % 256, (sku * 31) % 256)


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def make_raw_data(
    root: Path,
    replace: dict[str, bytes | None] | None = None,
    train_prefix: str = "train/",
    extra: dict[str, bytes] | None = None,
) -> Path:
    """Official-layout raw folder; ``replace`` swaps an image's bytes (None = leave it out of the zip)."""
    raw = root / "raw"
    raw.mkdir(parents=True)
    rows, images, i = [], {}, 1
    for sku, n in RAW_TRAIN_COUNTS.items():
        for _ in range(n):
            rows.append((f"{i}.jpg", sku, RAW_GROUPS[sku], "inshop" if i % 2 else "customer"))
            images[f"{i}.jpg"] = jpeg_bytes(sku_colour(sku), w=96 + i, h=72)
            i += 1
    pd.DataFrame(rows, columns=["name", "class", "group", "domain"]).to_csv(raw / "train.csv", index=False)
    test_rows, test_images = [], {}
    for j, sku in enumerate([101, 102, 103, 204, 205, 101]):
        name = f"{4713700 + j}.jpg"
        test_rows.append((name, sku, "Public" if j % 2 else "Private"))
        test_images[name] = jpeg_bytes(sku_colour(sku), w=72, h=100)
    pd.DataFrame(test_rows, columns=["name", "class", "Usage"]).to_csv(
        raw / "test_kaggletest.csv", index=False
    )
    for name, data in (replace or {}).items():
        if data is None:
            images.pop(name)
        else:
            images[name] = data
    write_zip(raw / "train.zip", {train_prefix + n: b for n, b in images.items()} | (extra or {}))
    write_zip(raw / "test.zip", {"test/" + n: b for n, b in test_images.items()})
    return raw


# --- the index stage (and the evaluate stage it reads) on make_eval_data ----------------------


def index_params(tmp_path, k=1, vote="count"):
    return write_project_params(
        tmp_path / "params.yaml",
        {
            "ensemble": {"members": {"m0": {}}, "weights": "fit"},
            "evaluate": {
                "batch_size": 4,
                "gallery_size": 2,
                "gallery_tile": 32,
                "tail_max_images": 3,
                "top_k": 5,
            },
            "tta": {"scales": [1.0], "crops": "center", "flip": True},
            "retrieval": {"phase": "train", "k": k, "vote": vote, "batch_size": 5, "search_batch": 2},
            "export": {"member": "m0", "phase": "train", "check_images": 6},
        },
    )


def evaluate_argv(params, ckpt, prepared, out) -> list[str]:
    """The evaluate stage's command line on make_eval_data's ``prepared``, outputs under ``out``."""
    return [
        "--params", str(params), "--member", "m0", "--phase", "train", "--checkpoint", str(ckpt),
        "--label-map", str(prepared / "label_map.csv"), "--train", str(prepared / "train.csv"),
        "--val", str(prepared / "val.csv"), "--test", str(prepared / "test.csv"),
        "--images-root", str(prepared), "--metrics", str(out / "metrics" / "train.json"),
        "--predictions", str(out / "predictions" / "train" / "m0.npz"),
        "--per-group", str(out / "plots" / "g.csv"), "--confused", str(out / "plots" / "c.csv"),
        "--gallery", str(out / "plots" / "e.png"),
    ]  # fmt: skip


def run_index(tmp_path, prepared, params):
    """evaluate (the classifier predictions the fusion needs), then the index stage."""
    ckpt = tmp_path / "models" / "m0" / "train" / "best.pt"
    if not ckpt.exists():
        make_checkpoint(ckpt, resolution=32)
    stage_module("evaluate").main(evaluate_argv(params, ckpt, prepared, tmp_path))
    classifier = tmp_path / "predictions" / "train" / "m0.npz"
    stage_module("index").main(
        index_argv(params, ckpt, prepared, prepared / "test.csv", classifier, tmp_path)
    )
    return ckpt


# --- the whole pipeline, tiny: a few synthetic SKUs at 32 px, one epoch per phase -------------


def tiny_params() -> dict:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    update = {
        "data": {
            "synthetic": {
                "num_groups": 2,
                "skus_per_group": 3,
                "train_max_per_sku": 6,
                "train_min_per_sku": 2,
                "test_per_sku": 2,
            }
        },
        "prepare": {"size": 48, "n_jobs": 1, "val_min_images": 2},  # SKUs of 2-6 images
        "balance": {"per_class": 2},
        "evaluate": {"batch_size": 16, "gallery_size": 3, "gallery_tile": 48},
        "tta": {"scales": [1.0], "flip": True},  # two views: the TTA average stays exercised
    }
    # one short epoch per phase at 32 px, for whichever phase sections params.yaml has
    small = {"epochs": 1, "resolution": 32, "batch_size": 8, "num_workers": 0, "milestones": []}
    for name in ("train", *PHASES[1:]):
        if isinstance(base.get(name), dict):
            update[name] = {k: v for k, v in small.items() if k in base[name] or name == "train"}
    return update


def index_argv(params, ckpt, prepared, test_csv, classifier, out) -> list[str]:
    """The index stage's command line on make_eval_data's ``prepared``, outputs under ``out``."""
    return [
        "--params", str(params), "--member", "m0", "--checkpoint", str(ckpt),
        "--label-map", str(prepared / "label_map.csv"), "--train", str(prepared / "train.csv"),
        "--val", str(prepared / "val.csv"), "--test", str(test_csv), "--images-root", str(prepared),
        "--classifier", str(classifier), "--index", str(out / "models" / "m0" / "index"),
        "--fused", str(out / "predictions" / "fused" / "m0.npz"),
        "--knn", str(out / "predictions" / "knn" / "m0.npz"),
        "--metrics", str(out / "metrics" / "retrieval.json"),
    ]  # fmt: skip


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (for a server or a rendezvous the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
