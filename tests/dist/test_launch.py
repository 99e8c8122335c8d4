"""products10k.dist.launch: plain Python for one process, torchrun on one node or several, and
``--join`` reading a stage's command from dvc.yaml (as dvc.yaml and the other nodes run it).

The commands are checked with ``--dry-run`` in this process; two of them are run for real."""

import subprocess
import sys

import pytest
import yaml
from dvc.repo import Repo

from products10k.dist.launch import main
from tests.helpers import free_port, write_params

# each process writes its own line to its own file: two ranks printing at once interleave their output
WHO = """import os, sys
line = f"{os.environ.get('WORLD_SIZE')} {os.environ.get('RANK')} {sys.argv[1:]}"
open(f"who-{os.getpid()}.txt", "w").write(line)
"""


def _run(tmp_path, **dist) -> list[str]:
    (tmp_path / "who.py").write_text(WHO)
    params = write_params(tmp_path / "params.yaml", dist=dist)
    cmd = [sys.executable, "-m", "products10k.dist.launch", "--params", str(params), "who.py", "-x"]
    subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120)
    return sorted(path.read_text() for path in tmp_path.glob("who-*.txt"))


def _dry(capsys, *args) -> list[str]:
    main([*args, "--dry-run"] if args[0] == "--join" else ["--dry-run", *args])
    return capsys.readouterr().out.split()


def test_one_process_runs_the_script_itself_without_torchrun(tmp_path):
    assert _run(tmp_path, nproc_per_node=1) == ["None None ['-x']"]


def test_several_processes_run_under_torchrun_as_ranks(tmp_path):
    assert _run(tmp_path, nproc_per_node=2) == ["2 0 ['-x']", "2 1 ['-x']"]


def test_restarts_alone_start_torchrun_even_for_one_process(tmp_path, capsys):
    params = str(write_params(tmp_path / "params.yaml", dist={"nproc_per_node": 1, "max_restarts": 2}))
    out = _dry(capsys, "--params", params, "who.py")
    assert "--standalone" in out and "--max-restarts=2" in out
    # inference (--single-node) is never restarted: it has no checkpoint to resume from
    assert _dry(capsys, "--params", params, "--single-node", "who.py") == [sys.executable, "who.py"]


def test_several_nodes_use_the_c10d_rendezvous_and_mark_the_output_node(tmp_path, capsys):
    dist = {"nproc_per_node": 2, "nnodes": 3, "rdzv_endpoint": "node0:29400", "max_restarts": 1}
    params = str(write_params(tmp_path / "params.yaml", dist=dist))
    out = _dry(capsys, "--params", params, "who.py", "--x")
    assert "PRODUCTS10K_OUTPUT_NODE=1" in out  # the node that runs dvc: its ranks come first
    # it hosts the rendezvous store; every wait (for nodes, for the store) is dist.timeout_s
    assert "--rdzv-conf=join_timeout=1800,read_timeout=1800,is_host=true" in out
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in out  # restarts get a fresh store (torch#135712)
    assert {"--nnodes=3", "--nproc_per_node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400",
            "--max-restarts=1"} <= set(out)  # fmt: skip
    assert out[-2:] == ["who.py", "--x"] and "--standalone" not in out
    # evaluate and index shard over this node's GPUs only
    single = _dry(capsys, "--params", params, "--single-node", "who.py")
    assert "--standalone" in single and "--nproc_per_node=2" in single
    assert "PRODUCTS10K_OUTPUT_NODE=1" not in single


@pytest.mark.parametrize(
    "dist, key",
    [
        ({"nproc_per_node": 0}, "nproc_per_node"),
        ({"nproc_per_node": True}, "nproc_per_node"),  # not the one-process shortcut: validated
        ({"nnodes": 2}, "dist.rdzv_endpoint"),
        ({"nnodes": 2, "rdzv_endpoint": "no-port"}, "rdzv_endpoint"),
    ],  # fmt: skip
)
def test_bad_dist_settings_name_the_key(tmp_path, dist, key):
    params = write_params(tmp_path / "params.yaml", dist=dist)
    with pytest.raises(SystemExit) as exc:
        main(["--params", str(params), "who.py"])
    assert key in str(exc.value)


def test_join_runs_the_stage_command_from_dvc_yaml_as_another_node(tmp_path, capsys, monkeypatch):
    dist = {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": "127.0.0.1:29400"}
    write_params(tmp_path / "params.yaml", dist=dist)
    stages = {
        "train": {"foreach": ["m0", "m1"], "do": {"cmd": "python -m products10k.dist.launch "
                                                   "--params params.yaml who.py --member ${item}"}},
        "evaluate": {"cmd": "python -m products10k.dist.launch --params params.yaml --single-node w.py"},
    }  # fmt: skip
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    Repo.init(str(tmp_path), no_scm=True).close()
    monkeypatch.chdir(tmp_path)
    ours = _dry(capsys, "--params", "params.yaml", "who.py", "--member", "m0")
    joined = _dry(capsys, "--join", "train@m0")
    # the same torchrun command (same rendezvous id), without the output node's mark, and a client
    # of the rendezvous store that the node running dvc hosts
    hosted = [w.replace("is_host=true", "is_host=false") for w in ours if w != "PRODUCTS10K_OUTPUT_NODE=1"]
    assert hosted == joined and len(ours) == len(joined) + 1 and "is_host=false" in " ".join(joined)
    assert "--rdzv-id=products10k-" in " ".join(joined)
    errors = [("evaluate", "nothing to join"), ("nope", "nope"), ("train", "train@m0, train@m1")]
    for stage, message in errors:
        with pytest.raises(SystemExit) as exc:
            main(["--join", stage])
        assert message in str(exc.value)


def test_join_takes_the_phases_in_turn_and_stops_at_the_first_failure(tmp_path, capfd, monkeypatch):
    dist = {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": "127.0.0.1:29400"}
    write_params(tmp_path / "params.yaml", dist=dist)
    cmd = "python -m products10k.dist.launch --params params.yaml"
    stages = {name: {"cmd": f"{cmd} {name}.py"} for name in ("a", "b")}
    stages["e"] = {"cmd": f"{cmd} --single-node e.py"}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    Repo.init(str(tmp_path), no_scm=True).close()
    monkeypatch.chdir(tmp_path)
    main(["--join", "a", "b", "--dry-run"])
    lines = capfd.readouterr().out.splitlines()
    assert [line.split()[-1] for line in lines] == ["a.py", "b.py"]
    with pytest.raises(SystemExit) as exc:
        main(["--join", "a", "e", "b", "--dry-run"])
    assert "--join e failed" in str(exc.value)
    out = capfd.readouterr()
    assert [line.split()[-1] for line in out.out.splitlines()] == ["a.py"] and "nothing to join" in out.err


def test_a_node_joining_a_run_that_never_starts_fails_after_dist_timeout_s(tmp_path):
    """Nobody hosts the rendezvous: the joiner waits dist.timeout_s for the store, then fails (c10d's
    own read timeout, 60 s, tried twice, would cut a patient joiner off after 2 minutes)."""
    dist = {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}", "timeout_s": 3}
    params = write_params(tmp_path / "params.yaml", dist=dist)
    (tmp_path / "who.py").write_text(WHO)
    cmd = [sys.executable, "-m", "products10k.dist.launch", "--joining", "--params", str(params)]
    done = subprocess.run([*cmd, "who.py"], cwd=tmp_path, capture_output=True, text=True, timeout=55)
    assert done.returncode != 0 and "The connection to the C10d store has failed" in done.stderr
    assert not list(tmp_path.glob("who-*.txt"))  # no worker started


def test_join_outside_a_dvc_project_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["--join", "train@m0"])
    assert "--join train@m0" in str(exc.value) and "DVC" in str(exc.value)
