"""Per-run cgroups: where they go on cgroup v1 and v2, their limits, and what happens without them.

The kernel's side (a real limit stopping a real run) is tested in test_sandbox.py where this host has the
controllers; here the layout logic runs against a directory tree laid out like a cgroup filesystem.
"""
import errno
import os

import pytest

from rewards import sandbox_cgroup


def fake_v2(tmp_path, monkeypatch, own="/user.slice/session-1.scope", controllers="cpu memory pids"):
    root = tmp_path / "cgroup2"
    base = root / own.strip("/")
    base.mkdir(parents=True)
    for directory in [root, *base.parents, base]:
        if str(directory).startswith(str(root)):
            (directory / "cgroup.controllers").write_text(controllers + "\n")
            (directory / "cgroup.subtree_control").write_text("")
    real_mkdir, real_makedirs = os.mkdir, os.makedirs

    def kernel_files(path):  # what the kernel puts in every new cgroup
        for name, text in (("cgroup.controllers", controllers + "\n"), ("cgroup.subtree_control", "")):
            if not os.path.exists(os.path.join(path, name)):
                with open(os.path.join(path, name), "w") as f:
                    f.write(text)

    monkeypatch.setattr(sandbox_cgroup.os, "mkdir", lambda path, *a, **k: (real_mkdir(path, *a, **k), kernel_files(path))[0])
    monkeypatch.setattr(sandbox_cgroup.os, "makedirs",
                        lambda path, *a, **k: (real_makedirs(path, *a, **k), kernel_files(path))[0])
    monkeypatch.setattr(sandbox_cgroup.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sandbox_cgroup, "_mounts", lambda: [("cgroup2", str(root), "/", set())])
    monkeypatch.setattr(sandbox_cgroup, "_own_paths", lambda: {"": own})
    return root, base


def test_v2_under_its_own_cgroup_with_limits(tmp_path, monkeypatch):
    _, base = fake_v2(tmp_path, monkeypatch)
    groups = sandbox_cgroup.Cgroups()
    parent = base / f"r1-sandbox.{os.getpid()}"
    assert groups.problems == {} and set(groups.parents.values()) == {str(parent)}
    assert set((base / "cgroup.subtree_control").read_text().split()) == {"+cpu", "+memory", "+pids"}
    procs = groups.create("run-1", 80 << 20, 1.0, 10)
    run = parent / "run-1"
    assert procs == [str(run / "cgroup.procs")]
    assert (run / "memory.max").read_text() == str(80 << 20) and (run / "cpu.max").read_text() == "100000 100000"
    assert (run / "pids.max").read_text() == "10" and (run / "memory.oom.group").read_text() == "1"


def test_v2_next_to_a_cgroup_that_holds_processes(tmp_path, monkeypatch):
    _, base = fake_v2(tmp_path, monkeypatch)
    real_enable = sandbox_cgroup._enable

    def enable(path, controllers):  # the kernel refuses: this cgroup has processes of its own
        if path == str(base):
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_enable(path, controllers)

    monkeypatch.setattr(sandbox_cgroup, "_enable", enable)
    groups = sandbox_cgroup.Cgroups()
    assert set(groups.parents.values()) == {str(base.parent / f"r1-sandbox.{os.getpid()}")}


def test_v2_without_the_controllers_names_what_is_missing(tmp_path, monkeypatch):
    fake_v2(tmp_path, monkeypatch, controllers="pids")
    groups = sandbox_cgroup.Cgroups()
    assert groups.has == {"pids"}
    assert "memory is not enabled" in groups.problems["memory"] and "cpu" in groups.problems


def test_stale_directories_of_dead_processes_are_removed(tmp_path, monkeypatch):
    _, base = fake_v2(tmp_path, monkeypatch)
    dead = 2**22 + 12345  # above pid_max: no such process
    (base / f"r1-sandbox.{dead}" / "run-3").mkdir(parents=True)
    (base / "r1-sandbox.1").mkdir()  # pid 1 is alive: kept
    for control in (base / f"r1-sandbox.{dead}").rglob("cgroup.*"):  # a real cgroup removes with its files
        control.unlink()
    sandbox_cgroup.Cgroups()
    assert not (base / f"r1-sandbox.{dead}").exists() and (base / "r1-sandbox.1").exists()


def test_without_root_nothing_is_created(monkeypatch):
    monkeypatch.setattr(sandbox_cgroup.os, "geteuid", lambda: 1000)
    groups = sandbox_cgroup.Cgroups()
    assert groups.has == set() and all("root" in why for why in groups.problems.values())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to read this host's cgroups")
def test_this_host_reports_each_controller():
    groups = sandbox_cgroup.Cgroups()
    assert set(groups.parents) | set(groups.problems) == set(sandbox_cgroup.CONTROLLERS)
