"""`python -m products10k.report.table1 run` end to end on the tiny pipeline: one seed's DVC
experiments (high and low resolution, and cRT's, a long-tail method's) through the real queue,
two at a time, the report's structure, its numbers against the experiments' metrics files, a
second run that recomputes nothing, and the terminal view."""

import json
import re
import subprocess
import sys

import dvc.api
import pytest
import yaml

from tests.helpers import deep_update, make_project, run, tiny_params

# One seed: the seed mean and spread over several are tests/report/test_stats.py's; a second seed
# here doubled the experiments (and this test's 2.5 minutes) for the same code paths.
SEEDS = 1


@pytest.mark.e2e
def test_table1_runs_seeds_as_experiments_and_reports_what_the_metrics_say(tmp_path):
    params = deep_update(
        tiny_params(),
        {
            # defaults off the paper's protocol, which every Table 1 experiment restores
            "train": {"resolution": 48, "loss": "balanced_softmax"},
            "prepare": {"val_tail_images": 1},
            # one post-hoc method (no experiment) and one with its own experiment (a finetune only)
            "table1": {"seeds": SEEDS, "bootstrap": 200, "jobs": 2, "methods": ["logit_adjust", "crt"]},
        },
    )
    project = make_project(tmp_path / "project", params)
    table1 = (sys.executable, "-m", "products10k.report.table1")
    first = run(project, *table1, "run", timeout=1200)

    report = json.loads((project / "reports" / "table1.json").read_text())
    assert report["seeds"] == SEEDS and (project / "reports" / "table1.png").stat().st_size > 0
    md = (project / "reports" / "table1.md").read_text()
    assert md.strip() in first.stdout and md.count("\n| ") == 8  # printed too; header + 7 rows
    rows = {r["key"]: r for r in report["rows"]}
    assert list(rows) == [
        "baseline", "train", "finetune_balanced", "finetune_accuracy", "logit_adjust", "logit_adjust_1", "crt"
    ]  # fmt: skip
    assert rows["baseline"]["title"] == "train @ 24 px (baseline)"

    # every figure is the seed mean of the experiments' own metrics files
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname:lstrip=4) %(objectname)", "refs/exps/"],
        cwd=project, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    revs = dict(zip(refs[::2], refs[1::2], strict=True))
    assert len(revs) == 3 * SEEDS and all(re.fullmatch(r"t1-[0-9a-f]{7}-s\d-(high|low|crt)", n) for n in revs)

    def metric(role, phase, part):
        values = []
        for seed in range(SEEDS):
            name = next(n for n in revs if n.endswith(f"-s{seed}-{role}"))
            with dvc.api.open(f"metrics/m0/{phase}.json", repo=str(project), rev=revs[name]) as f:
                test = json.load(f)["test"]
            values.append(test["top1"] if part == "all" else test[part]["top1"])
        return sum(values) / SEEDS

    for key, role, phase in [("baseline", "low", "train"), ("train", "high", "train"),
                             ("finetune_balanced", "high", "finetune_balanced"),
                             ("finetune_accuracy", "high", "finetune_accuracy"),
                             ("crt", "crt", "finetune_balanced")]:  # fmt: skip
        for part in ("all", "head", "tail"):
            if part in rows[key]:
                assert rows[key][part]["top1"] == pytest.approx(metric(role, phase, part)), (key, part)
    gain = rows["train"]["all"]["gain"]
    assert gain["estimate"] == pytest.approx(rows["train"]["all"]["top1"] - rows["baseline"]["all"]["top1"])
    assert gain["low"] <= gain["estimate"] <= gain["high"]
    # the long-tail rows gain against train; cRT's experiment really froze the backbone
    crt = rows["crt"]["all"]["gain"]["estimate"]
    assert crt == pytest.approx(rows["crt"]["all"]["top1"] - rows["train"]["all"]["top1"])
    crt_name = next(n for n in revs if n.endswith("-s0-crt"))
    with dvc.api.open("params.yaml", repo=str(project), rev=revs[crt_name]) as f:
        crt_params = yaml.safe_load(f)
    assert crt_params["finetune_balanced"]["freeze_backbone"] is True
    assert crt_params["balance"]["per_class"] is None
    # the paper's protocol whatever the defaults: cross-entropy, no val leave-out of the tail
    assert crt_params["train"]["loss"] == "ce" and crt_params["prepare"]["val_tail_images"] == 0
    assert rows["logit_adjust_1"]["tau"] == [1.0] and len(rows["logit_adjust"]["tau"]) == SEEDS

    # nothing changed: nothing is queued or recomputed, the same report
    again = run(project, *table1, "run", timeout=600)
    assert "already run" in again.stderr and "queued" not in again.stderr
    assert json.loads((project / "reports" / "table1.json").read_text()) == report

    # the terminal view: the workspace (nothing reproduced there) and a named experiment
    high0 = next(n for n in revs if n.endswith("-s0-high"))
    shown = run(project, *table1, "show", high0).stdout
    assert max(len(line) for line in shown.splitlines()) <= 64
    with dvc.api.open("metrics/m0/finetune_accuracy.json", repo=str(project), rev=revs[high0]) as f:
        top1 = json.load(f)["test"]["top1"]
    line = next(ln.split() for ln in shown.splitlines() if ln.strip().startswith("finetune_accuracy"))
    assert line[1] == f"{100 * top1:.1f}"
    assert "(not run)" in run(project, *table1, "show").stdout
