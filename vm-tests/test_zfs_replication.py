"""Replication between two ZFS guests over real ssh: push, pull, resume after a cut, target pruning.

alpha is the application host (pool ``tank``, datasets under ``tank/persist``); beta is the backup
host. Each guest reaches the other only through the host (10.0.2.2:<port>). The receiving side is
``snapsync serve`` as an ssh forced command, exactly as in production.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from collections.abc import Iterator

import pytest

from machine import HOST_FROM_GUEST, Machine

SSH_OPTIONS = '["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"]'


def sh(machine: Machine, script: str, timeout: float = 900) -> str:
    return machine.run(script, timeout=timeout).check().stdout


def authorize(server: Machine, client: Machine, role: str, root: str, name: str) -> str:
    """Give ``client`` a key that ``server`` confines to ``snapsync serve --role ROLE --root ROOT``."""
    name = f"{name}-{uuid.uuid4().hex[:6]}"  # sshd uses the first line matching a key: one key per test
    key = f"/root/.ssh/{name}"
    pub = sh(client, f"test -f {key} || ssh-keygen -q -t ed25519 -N '' -f {key}; cat {key}.pub")
    line = sh(server, f"echo {shlex.quote(pub.strip())} > /tmp/{name}.pub && snapsync authorize --role {role} --root {shlex.quote(root)} /tmp/{name}.pub")
    sh(server, f"echo {shlex.quote(line.strip())} >> /root/.ssh/authorized_keys")
    return key


def ssh_table(server: Machine, key: str, path: str) -> str:
    return (
        f'type = "ssh"\nhost = "{HOST_FROM_GUEST}"\nport = {server.port}\nuser = "root"\n'
        f'identity_file = "{key}"\nssh_options = {SSH_OPTIONS}\npath = "{path}"\n'
    )


def policy(datasets: list[str], target: str, extra: str = "", retention: str = "keep_last = 100") -> str:
    return "\n".join([
        "version = 1", 'host = "alpha"', "[defaults]", 'interval = "1d"', "[defaults.retention]", retention,
        "[groups.app]", 'backend = "zfs"', "datasets = [" + ", ".join(f'"{d}"' for d in datasets) + "]",
        'targets = ["nas"]', "[targets.nas]", target, extra,
    ]) + "\n"


def snapsync_json(machine: Machine, policy_path: str, *args: str, check: bool = True) -> dict:  # type: ignore[type-arg]
    result = machine.run(["snapsync", "-p", policy_path, *args, "--json"], timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(f"snapsync {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def tree_sum(machine: Machine, directory: str) -> str:
    return sh(machine, f"cd {shlex.quote(directory)} && find . -type f -print0 | sort -z | xargs -0 sha256sum")


@pytest.fixture
def names(alpha: Machine, beta: Machine) -> Iterator[tuple[str, str]]:
    """A fresh source dataset on alpha and receiving root on beta per test; removed afterwards."""
    tag = uuid.uuid4().hex[:6]
    src, root = f"tank/persist-{tag}", f"tank/backup-{tag}"
    sh(alpha, f"zfs create -p {src}/db && zfs create {src}/files")
    sh(beta, f"zfs create -o canmount=off {root}")
    yield src, root
    alpha.run(f"zfs destroy -r -f {src}; zfs destroy -r -f tank/pulled-{tag}")
    beta.run(f"zfs destroy -r -f {root}; zfs destroy -r -f tank/persist-{tag}")


def cut_then_resume(runner: Machine, policy_path: str, limited: str, kill: str, receiver: Machine, root: str) -> str:
    """Run ``replicate`` under ``limited`` (a policy with ``rate_limit = "64K"``) and, once the
    receiver's ``zfs receive`` runs, SIGKILL it (its whole process group) and the processes matching
    ``kill`` mid-stream, as a crash would; check the receiver kept a resume
    token; replicate again without the limit. Returns the name of the snapshot the resume finished."""
    runner.run(f"setsid snapsync -p {policy_path} replicate </dev/null >/root/cut.log 2>&1 &")
    for _ in range(300):  # set-up (listings over ssh, serve's start) takes seconds to minutes under emulation
        if receiver.run("pgrep -f '^zfs receive'").returncode == 0:
            break
        time.sleep(1)
    else:
        raise AssertionError("no zfs receive started: " + runner.run("cat /root/cut.log").stdout)
    time.sleep(8)  # about 512 KiB of the 1.5 MiB stream at 64 KiB/s
    pattern = shlex.quote(f"-p {policy_path} replicate")
    runner.run(  # the whole process group, as timeout(1) would: snapsync, ssh and the local zfs send or receive
        f"for p in $(pgrep -f -- {pattern}); do kill -KILL -- -$(ps -o pgid= -p $p | tr -d ' ') 2>/dev/null; done; "
        f"pkill -KILL -f {shlex.quote(kill)} || true"
    )
    for _ in range(30):  # the receive notices the cut stream once its session closes
        if sh(receiver, f"zfs get -H -o value receive_resume_token -r {root} | grep -v '^-$' || true").strip():
            break
        time.sleep(1)
    else:
        raise AssertionError(
            "the cut receive left no resume token: " + sh(receiver, f"zfs list -r -t all {root}") + runner.run("cat /root/cut.log").stdout
        )
    unlimited = limited.replace('rate_limit = "64K"\n', "")
    assert unlimited != limited
    sh(runner, f"cat > {policy_path} <<'EOF'\n{unlimited}EOF")
    target = snapsync_json(runner, policy_path, "replicate")["groups"][0]["targets"][0]
    assert target["ok"], target["errors"]
    assert [s["base"] for s in target["sent"]] == ["(resumed)"]
    assert 0 < target["sent"][0]["bytes"] < 1536 * 1024, "the resume sent the whole stream again"
    return str(target["sent"][0]["name"])


def write(machine: Machine, dataset: str, name: str, kib: int, seed: int) -> None:
    sh(machine, f"head -c {kib * 1024} /dev/urandom > /{dataset}/{name} && echo {seed} > /{dataset}/seed")


def test_push_full_then_incremental_with_target_pruning(alpha: Machine, beta: Machine, names: tuple[str, str]) -> None:
    src, root = names
    key = authorize(beta, alpha, "receive", root, "push-key")
    datasets = [f"{src}/db", f"{src}/files"]
    text = policy(datasets, ssh_table(beta, key, root) + "[targets.nas.retention]\nkeep_last = 2\n")
    sh(alpha, f"cat > /root/push.toml <<'EOF'\n{text}EOF")
    for round_ in range(3):
        for d in datasets:
            write(alpha, d, f"r{round_}.bin", 64, round_)
        sh(alpha, "snapsync -p /root/push.toml snapshot")
        report = snapsync_json(alpha, "/root/push.toml", "run")  # not due again: replicates, prunes
        target = report["groups"][0]["targets"][0]
        assert target["ok"], target["errors"]
        kinds = {s["kind"] for s in target["sent"]}
        assert kinds == ({"full"} if round_ == 0 else {"incremental"}), target["sent"]
    snap = target["newest_common"]
    listing = sh(beta, f"zfs list -H -o name -t snapshot -r {root}").split()
    per_dataset = {d: [n for n in listing if f"/{d.split('/')[-1]}@" in n] for d in datasets}
    assert all(len(v) == 2 for v in per_dataset.values()), listing  # keep_last = 2 on the target
    holds = sh(alpha, f"zfs holds -H {src}/db@{snap}")
    assert "snapsync:target:nas" in holds
    listed = snapsync_json(alpha, "/root/push.toml", "list", "--local")["groups"][0]["datasets"][0]["snapshots"]
    entries = {(s["kind"], s["name"]): s["holds"] for s in listed}
    assert entries[("snapshot", snap)] == ["target:nas"] and ("bookmark", snap) in entries
    assert sum(1 for kind, _ in entries if kind == "bookmark") == 1  # the hold moved: older bookmarks went
    copy = sh(beta, f"zfs list -H -o name {root}/app/{src.replace('/', '/')}/db").strip()
    sh(beta, f"zfs set mountpoint=/mnt/check {copy} && zfs mount {copy}")
    assert tree_sum(beta, f"/mnt/check/.zfs/snapshot/{snap}") == tree_sum(alpha, f"/{src}/db/.zfs/snapshot/{snap}")


def test_interrupted_push_resumes_over_ssh(alpha: Machine, beta: Machine, names: tuple[str, str]) -> None:
    src, root = names
    key = authorize(beta, alpha, "receive", root, "resume-key")
    text = policy([f"{src}/files"], ssh_table(beta, key, root) + 'rate_limit = "64K"\n')
    write(alpha, f"{src}/files", "big.bin", 1536, 1)
    sh(alpha, f"cat > /root/resume.toml <<'EOF'\n{text}EOF")
    sh(alpha, "snapsync -p /root/resume.toml snapshot")
    snap = cut_then_resume(alpha, "/root/resume.toml", text, "zfs send", beta, root)
    copy = f"{root}/app/{src}/files"
    assert sh(beta, f"zfs get -H -p -o value guid {copy}@{snap}") == sh(alpha, f"zfs get -H -p -o value guid {src}/files@{snap}")


def test_pull_from_the_application_host(alpha: Machine, beta: Machine, names: tuple[str, str]) -> None:
    src, root = names
    key = authorize(alpha, beta, "send", "tank", "pull-key")
    sh(alpha, f"zfs snapshot {src}/db@snapsync_2026-11-26T10:00:00Z")
    write(alpha, f"{src}/db", "later.bin", 32, 2)
    sh(alpha, f"zfs snapshot {src}/db@snapsync_2026-11-26T11:00:00Z")
    rel = src.split("/", 1)[1]
    text = "\n".join([
        "version = 1", 'host = "beta"', "[defaults.retention]", "keep_last = 100",
        "[pulls.alpha]", ssh_table(alpha, key, "tank").replace('path = "tank"', 'path = "tank"'),
        f'datasets = ["tank/{rel}/db"]', f'into = "{root}"',
    ]) + "\n"
    sh(beta, f"cat > /root/pull.toml <<'EOF'\n{text}EOF")
    report = snapsync_json(beta, "/root/pull.toml", "replicate")
    pulled = report["groups"][0]["targets"][0]
    assert pulled["ok"], pulled["errors"]
    assert [s["kind"] for s in pulled["sent"]] == ["full", "incremental"]
    holds = sh(alpha, f"zfs holds -H {src}/db@snapsync_2026-11-26T11:00:00Z")
    assert "snapsync:pull:beta.alpha" in holds
    again = snapsync_json(beta, "/root/pull.toml", "replicate")
    assert again["groups"][0]["targets"][0]["sent"] == []


def test_interrupted_pull_resumes_through_the_send_role(alpha: Machine, beta: Machine, names: tuple[str, str]) -> None:
    src, root = names
    key = authorize(alpha, beta, "send", "tank", "pull-resume-key")
    write(alpha, f"{src}/files", "big.bin", 1536, 1)
    sh(alpha, f"zfs snapshot {src}/files@snapsync_2026-11-26T10:00:00Z")
    rel = src.split("/", 1)[1]
    text = "\n".join([
        "version = 1", 'host = "beta"', "[defaults.retention]", "keep_last = 100",
        "[pulls.alpha]", ssh_table(alpha, key, "tank"), 'rate_limit = "64K"',
        f'datasets = ["tank/{rel}/files"]', f'into = "{root}"',
    ]) + "\n"
    sh(beta, f"cat > /root/pull-resume.toml <<'EOF'\n{text}EOF")
    assert cut_then_resume(beta, "/root/pull-resume.toml", text, "snapsync serve", beta, root) == "snapsync_2026-11-26T10:00:00Z"
    copy = f"{root}/alpha/{src}/files"
    assert sh(beta, f"zfs get -H -p -o value guid {copy}@snapsync_2026-11-26T10:00:00Z") == \
        sh(alpha, f"zfs get -H -p -o value guid {src}/files@snapsync_2026-11-26T10:00:00Z")
