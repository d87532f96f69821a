"""deploy/nixos/module.nix evaluated with nixpkgs' own module system (lib.evalModules of the vendored
nixpkgs lib, nix-instantiate --store dummy://) against NixOS's option types (nixos.nix): every NixOS
example of README.md and docs/, the hosts in hosts/, and the definitions in bad/ that must fail naming
their option. What each system would build runs as the Nix sandbox runs it (another uid, store files
owned by nobody), and its units go through systemd-analyze verify and security."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.required import missing, tool
import tomli_w

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LIB = HERE / "vendor" / "nixpkgs-lib" / "lib"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SNAPSYNC = Path(sys.executable).with_name("snapsync")
NOBODY = 65534
BUILDER = 30000  # the sandbox builds as an unprivileged uid (nixbld); one that owns nothing here
# The host the docs' examples are written for: btrfs for /persist, ZFS on the receiving side.
EXAMPLE_HOST = '{ boot.supportedFilesystems = [ "btrfs" "zfs" ]; }'

Report = dict[str, Any]


required = tool


def nix_lib() -> Path:
    """The vendored nixpkgs lib; without it this tier would prove nothing, so CI fails rather than skips."""
    if not (LIB / "default.nix").exists():
        missing(str(LIB), "tests/nixos/vendor/README.md says where it comes from")
    return LIB


def nix_eval(expr: str) -> subprocess.CompletedProcess[str]:
    nix_lib()
    return subprocess.run(
        [required("nix-instantiate"), "--store", "dummy://", "--eval", "--strict", "--json", "--expr", expr],
        capture_output=True, text=True, cwd=HERE,
    )


def doc_examples() -> dict[str, str]:
    """Every ```nix block of the README and docs, as a NixOS module (a bare attribute path gets its braces)."""
    examples = {}
    for doc in DOCS:
        blocks = re.findall(r"^```nix\n(.*?)^```", doc.read_text(), re.M | re.S)
        for i, block in enumerate(blocks, 1):
            text = block.replace("/path/to/snapsync", str(REPO))
            examples[f"{doc.relative_to(REPO)}#{i}"] = text if text.lstrip().startswith("{") else "{\n" + text + "}\n"
    return examples


HOSTS = sorted(p.relative_to(HERE).as_posix() for p in (HERE / "hosts").glob("*.nix"))
BAD = sorted(p.relative_to(HERE).as_posix() for p in (HERE / "bad").glob("*.nix"))


def expected_error(case: str) -> str:
    first = (HERE / case).read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{case}: the first line says which error it must give"
    return first.removeprefix("# error: ")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Report]:
    """Every example and host, evaluated in one nix-instantiate run."""
    tmp = tmp_path_factory.mktemp("examples")
    cases = {}
    for name, text in doc_examples().items():
        module = tmp / (re.sub(r"[^A-Za-z0-9.-]", "-", name) + ".nix")
        module.write_text(text)
        cases[name] = f"[ {EXAMPLE_HOST} {module} ]"
    for host in HOSTS:
        cases[host] = f"[ {HERE / host} ]"
    listing = "{\n" + "".join(f"  {json.dumps(name)} = {modules};\n" for name, modules in cases.items()) + "}\n"
    (tmp / "cases.nix").write_text(listing)
    start = time.monotonic()
    proc = nix_eval(f"import ./eval.nix {{ cases = import {tmp / 'cases.nix'}; }}")
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    print(f"\nevaluated {len(cases)} systems in {took:.2f} s ({took / len(cases):.3f} s each)")
    reports: dict[str, Report] = json.loads(proc.stdout)
    return reports


def test_the_docs_have_their_examples() -> None:
    names = set(doc_examples())
    assert {"README.md#1", "README.md#2", "docs/monitoring.md#1", "docs/monitoring.md#2"} <= names, names


def test_every_example_and_host_evaluates(evaluated: dict[str, Report]) -> None:
    assert set(evaluated) == set(doc_examples()) | set(HOSTS)
    for name, report in evaluated.items():
        print(f"\n===== {name}")
        for unit, text in {**{f"{n}.service": t for n, t in report["services"].items()},
                           **{f"{n}.timer": t for n, t in report["timers"].items()}}.items():
            print(f"--- {unit}\n{text}")
        for user, entry in report["users"].items():
            if user not in ("root", "nobody"):
                print(f"--- user {user}: {json.dumps(entry)}")
        policy = report["etc"].get("snapsync/policy.toml")
        if policy and "toml" in policy["source"].get("env", {}).get("policy", {}):
            print(f"--- /etc/snapsync/policy.toml\n{tomli_w.dumps(policy['source']['env']['policy']['toml'])}")
        for warning in report["warnings"]:
            print(f"--- warning: {warning}")
        for user in report["users"].values():
            assert ":" not in user["description"] and ":" not in user["name"], user


# --- what the system's build runs, as the sandbox runs it -------------------------------------------


@pytest.fixture
def sandbox() -> Iterator[Path]:
    """A directory the unprivileged builder can reach (pytest's own temporary directories are private)."""
    path = Path(tempfile.mkdtemp(prefix="snapsync-nix-sandbox-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def sandbox_build(build: dict[str, Any], snapsync_exe: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """Run a stand-in derivation's script as the Nix sandbox would: as an unprivileged builder, in an
    empty build directory, with every input a file owned by another uid (nobody) and read-only."""
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o755)
    store = tmp / "store"
    store.mkdir(exist_ok=True)
    store.chmod(0o777)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/homeless-shelter", "out": str(store / Path(build["path"]).name)}
    for name, value in build["env"].items():
        copy = store / Path(value["path"]).name
        if "toml" in value:
            copy.write_text(tomli_w.dumps(value["toml"]))
        else:
            shutil.copyfile(value["path"], copy)
        os.chown(copy, NOBODY, NOBODY)
        os.chmod(copy, 0o444)
        env[name] = str(copy)
    top = tmp / "build"
    top.mkdir()
    argv, uid = builder()
    os.chown(top, uid, uid)
    env |= {"TMPDIR": str(top), "NIX_BUILD_TOP": str(top)}
    script = build["script"].replace(snapsync_exe, str(SNAPSYNC))
    return subprocess.run([*argv, "bash", "-eu", "-o", "pipefail", "-c", script], cwd=top, env=env, capture_output=True, text=True)


@functools.cache
def builder() -> tuple[tuple[str, ...], int]:
    """How to run as the builder, and its uid: unprivileged, as in the sandbox; where this checkout's
    Python is out of that uid's reach (a pyenv below /root), root without any capability."""
    unprivileged = (required("setpriv"), f"--reuid={BUILDER}", f"--regid={BUILDER}", "--clear-groups")
    if subprocess.run([*unprivileged, "bash", "-c", f"{SNAPSYNC} --version"], capture_output=True).returncode == 0:
        return unprivileged, BUILDER
    print(f"{SNAPSYNC} cannot run as uid {BUILDER}: building as root without capabilities")
    return (required("setpriv"), "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"), 0


def built_policies(evaluated: dict[str, Report]) -> Iterator[tuple[str, Report, dict[str, Any]]]:
    for name, report in evaluated.items():
        source = report["etc"].get("snapsync/policy.toml", {}).get("source", {})
        if "script" in source:
            yield name, report, source


def test_the_policy_is_checked_at_build_time_as_the_sandbox_sees_it(evaluated: dict[str, Report], sandbox: Path) -> None:
    cases = list(built_policies(evaluated))
    assert len(cases) >= 5
    builder()
    with ThreadPoolExecutor(4) as pool:
        builds = list(pool.map(lambda i: sandbox_build(cases[i][2], cases[i][1]["snapsyncExe"], sandbox / f"case{i}"), range(len(cases))))
    for i, ((name, _, build), proc) in enumerate(zip(cases, builds)):
        assert proc.returncode == 0, (name, proc.stdout, proc.stderr)
        policy = next(iter(build["env"].values()))
        store = sandbox / f"case{i}" / "store"
        assert (store / Path(build["path"]).name).read_bytes() == (store / Path(policy["path"]).name).read_bytes(), name


def test_a_syntax_check_ignores_ownership_a_real_load_does_not(evaluated: dict[str, Report], tmp_path: Path) -> None:
    """The full host's policy has hooks: owned by another uid, as a store file appears in the sandbox,
    --syntax-only passes; the run-time check and `run` still refuse the same file."""
    toml = evaluated["hosts/full.nix"]["etc"]["snapsync/policy.toml"]["source"]["env"]["policy"]["toml"]
    assert toml["groups"]["forge"]["hooks"]
    os.chmod(tmp_path, 0o755)
    policy = tmp_path / "policy.toml"
    policy.write_text(tomli_w.dumps(toml))
    os.chown(policy, NOBODY, NOBODY)
    policy.chmod(0o444)
    syntax = subprocess.run([str(SNAPSYNC), "policy", "check", "--syntax-only", str(policy)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    refusal = f"defines hooks (commands run as root) but is owned by uid {NOBODY}"
    for argv in (["policy", "check", str(policy)], ["-p", str(policy), "run", "--dry-run"], ["-p", str(policy), "run"]):
        proc = subprocess.run([str(SNAPSYNC), *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and refusal in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)


def test_a_policy_snapsync_refuses_fails_the_build(sandbox: Path) -> None:
    """What Nix's types cannot see (a group naming an undefined target) fails the build, in one line."""
    case = "bad-build/unknown-target.nix"
    proc = nix_eval(f"import ./eval.nix {{ cases = {{ bad = [ {HERE / case} ]; }}; }}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["bad"]
    build = report["etc"]["snapsync/policy.toml"]["source"]
    built = sandbox_build(build, report["snapsyncExe"], sandbox)
    print(built.stderr)
    assert built.returncode == 2 and expected_error(case) in built.stderr
    assert built.stderr.count("\n") == 1 and "Traceback" not in built.stderr


def test_the_policy_file_of_the_host_is_never_read_at_build_time(evaluated: dict[str, Report]) -> None:
    report = evaluated["hosts/runtime-policy.nix"]
    assert report["etc"]["snapsync/policy.toml"] == {"mode": "symlink", "source": {"path": "/run/secrets/snapsync-policy.toml"}}
    assert any('textfile = "/var/lib/prometheus-node-exporter/snapsync.prom"' in w for w in report["warnings"])
    stored = evaluated["hosts/store-policy.nix"]["etc"]["snapsync/policy.toml"]["source"]
    assert stored["env"]["policy"]["path"] == str(HERE / "hosts" / "policy.toml") and "--syntax-only" in stored["script"]


def test_node_exporter_reads_where_snapsync_writes(evaluated: dict[str, Report]) -> None:
    for name, report in evaluated.items():
        policy = report["etc"].get("snapsync/policy.toml", {}).get("source", {}).get("env", {}).get("policy", {})
        if "toml" not in policy:
            continue
        directory = os.path.dirname(policy["toml"]["monitoring"]["textfile"])
        assert f"d {directory} 0755 root root -" in report["tmpfiles"], name
        if report["nodeExporter"]["enable"]:
            assert report["nodeExporter"]["extraFlags"] == [f"--collector.textfile.directory={directory}"], name
            assert "textfile" in report["nodeExporter"]["enabledCollectors"], name
    override = evaluated["hosts/textfile-override.nix"]
    assert override["nodeExporter"]["extraFlags"] == ["--collector.textfile.directory=/var/lib/prometheus-node-exporter-text"]
    assert any("ping_url is in the world-readable Nix store" in w for w in override["warnings"])


# --- the receiving role ---------------------------------------------------------------------------------


def authorized_keys(report: Report) -> tuple[str, dict[str, Any]]:
    [(path, entry)] = [(p, e) for p, e in report["etc"].items() if p.startswith("ssh/snapsync_authorized_keys.d/")]
    assert entry["mode"] == "0444", "sshd's StrictModes refuses a file reached through the group-writable /nix/store"
    assert report["openssh"] == {"enable": True, "authorizedKeysFiles": ["/etc/ssh/snapsync_authorized_keys.d/%u"]}
    return path.rsplit("/", 1)[1], entry["source"]


@pytest.mark.parametrize(("host", "user", "root", "flags"), [
    ("hosts/full.nix", "snapsync-receive", "tank/backup", ["--allow-restore"]),
    ("hosts/btrfs-receiver.nix", "root", "/srv/back ups", ["--append-only", "--allow-restore"]),
    ("hosts/append-only.nix", "backup", "tank/backup", ["--append-only"]),
])
def test_authorized_keys_are_the_lines_snapsync_authorize_prints(
    evaluated: dict[str, Report], sandbox: Path, host: str, user: str, root: str, flags: list[str]
) -> None:
    tmp_path = sandbox
    report = evaluated[host]
    assert authorized_keys(report)[0] == user
    build = authorized_keys(report)[1]
    proc = sandbox_build(build, report["snapsyncExe"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "store" / Path(build["path"]).name).read_text().splitlines()
    keys = re.findall(r"printf '%s\\n' '([^']+)' > key.pub", build["script"])
    assert len(lines) == len(keys) >= 1
    for key, line in zip(keys, lines):
        (tmp_path / "k.pub").write_text(key + "\n")
        direct = subprocess.run([str(SNAPSYNC), "authorize", "--root", root, "--role", "receive", "--command", str(SNAPSYNC),
                                 *flags, str(tmp_path / "k.pub")], capture_output=True, text=True, check=True)
        assert line == direct.stdout.rstrip("\n")
        forced = re.fullmatch(r'command="([^"]*)",restrict (.*)', line)
        assert forced is not None and forced.group(2) == key
        assert shlex.split(forced.group(1)) == [str(SNAPSYNC), "serve", "--root", root, "--role", "receive", *flags]
    listed = subprocess.run([required("ssh-keygen"), "-l", "-f", str(tmp_path / "store" / Path(build["path"]).name)],
                            capture_output=True, text=True)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == len(keys), listed.stdout + listed.stderr
    print("\n".join(lines))


FAKE_ZFS = """#!/bin/sh
echo "$*" >> "$ZFS_LOG"
case "$1" in list) grep -qx "create -p -o canmount=off $5" "$ZFS_LOG" ;; esac
"""


@pytest.mark.parametrize(("host", "user", "granted"), [
    ("hosts/full.nix", "snapsync-receive", "create,mount,receive,hold,release,userprop,canmount,destroy,rollback,send"),
    ("hosts/append-only.nix", "backup", "create,mount,receive,hold,release,userprop,canmount"),
])
def test_zfs_delegation_is_exactly_this_configurations(evaluated: dict[str, Report], tmp_path: Path, host: str, user: str, granted: str) -> None:
    """Start takes back whatever was delegated before and grants this set; stop (a removed or changed
    unit, stopped with its old definition) takes it back. A fake zfs records the commands."""
    report = evaluated[host]
    unit = report["services"]["snapsync-receive-allow"]
    jobs = report["jobs"]
    start, stop = (re.search(rf"^{key}=(\S+)", unit, re.M) for key in ("ExecStart", "ExecStop"))
    assert start and stop
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "zfs").write_text(FAKE_ZFS)
    (tmp_path / "bin" / "zfs").chmod(0o755)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "ZFS_LOG": str(tmp_path / "log")}
    for job in (start.group(1), start.group(1), stop.group(1)):
        subprocess.run(["bash", "-e", "-c", jobs[job]], env=env, check=True)
    log = (tmp_path / "log").read_text().splitlines()
    run = [f"list -H -o name tank/backup", f"unallow -u {user} tank/backup", f"allow -u {user} {granted} tank/backup"]
    assert log == [run[0], "create -p -o canmount=off tank/backup", *run[1:], *run, run[0], run[1]]


def test_the_receiving_account_is_what_nixos_accepts(evaluated: dict[str, Report]) -> None:
    account = evaluated["hosts/full.nix"]["users"]["snapsync-receive"]
    assert account["isSystemUser"] and account["group"] == "snapsync-receive" and account["shell"] == "/bin/bash"
    assert "snapsync-receive" in evaluated["hosts/full.nix"]["groups"]
    btrfs = evaluated["hosts/btrfs-receiver.nix"]["users"]
    assert set(btrfs) == {"root", "nobody"} and btrfs["root"]["description"] == "System administrator"


# --- units ---------------------------------------------------------------------------------------------


def write_units(report: Report, directory: Path) -> list[Path]:
    """The units as files systemd can load: the package's program is this checkout's snapsync, a job
    script a file of its own."""
    directory.mkdir()
    paths = []
    if any(re.search(r"^Requires=.*\bzfs\.target", text, re.M) for text in report["services"].values()):
        (directory / "zfs.target").write_text("[Unit]\nDescription=ZFS (the host's, where ZFS is enabled)\n")
        paths.append(directory / "zfs.target")
    replace = {report["snapsyncExe"]: str(SNAPSYNC)}
    for i, (job, text) in enumerate(report["jobs"].items()):
        script = directory / f"job{i}"
        script.write_text("#!/bin/bash\nset -e\n\n" + text)
        script.chmod(0o755)
        replace[job] = str(script)
    for kind in ("services", "timers"):
        for name, text in report[kind].items():
            for fake, real in replace.items():
                text = text.replace(fake, real)
            path = directory / f"{name}.{kind[:-1] if kind == 'timers' else 'service'}"
            path.write_text(text)
            paths.append(path)
    return paths


def exposure(analyze: str, unit: Path) -> float:
    proc = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True, text=True)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return float(found.group(1))


def test_units_pass_systemd_analyze(evaluated: dict[str, Report], tmp_path: Path) -> None:
    analyze = required("systemd-analyze")
    for i, (name, report) in enumerate(evaluated.items()):
        units = write_units(report, tmp_path / f"case{i}")
        if not units:
            continue
        verified = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True, text=True)
        assert verified.returncode == 0 and not verified.stderr.strip(), (name, verified.stdout + verified.stderr)
        scores = {u.name: exposure(analyze, u) for u in units if u.suffix == ".service"}
        print(f"{name}: systemd-analyze security --offline=yes: {scores}")
        for unit, score in scores.items():
            shipped = REPO / "deploy" / "systemd" / unit
            if shipped.exists():
                assert score <= exposure(analyze, installed(shipped, tmp_path / f"shipped{i}")), (name, unit)


def installed(unit: Path, directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    copy = directory / unit.name
    copy.write_text(unit.read_text().replace("/usr/local/bin/snapsync", str(SNAPSYNC)))
    return copy


def test_every_command_the_units_run_is_one_snapsync_accepts(evaluated: dict[str, Report], tmp_path: Path) -> None:
    commands = {
        tuple(shlex.split(command)[1:]): f"{name}: {unit}"
        for name, report in evaluated.items() for unit, text in report["services"].items()
        for command in re.findall(r"^ExecStart=(.+)$", text, re.M) if shlex.split(command)[0] == report["snapsyncExe"]
    }
    assert len(commands) >= 5

    def attempt(argv: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        args = [str(tmp_path / "absent.toml") if a == "/etc/snapsync/policy.toml" else a for a in argv]
        return subprocess.run([str(SNAPSYNC), *args], capture_output=True, text=True)

    with ThreadPoolExecutor(4) as pool:
        attempts = dict(zip(commands, pool.map(attempt, commands)))
    for argv, proc in attempts.items():
        assert "/etc/snapsync/policy.toml" in argv, commands[argv]  # each names the policy: never run it here for real
        said = proc.stdout + proc.stderr  # check answers on stdout, as a monitoring plugin does
        assert proc.returncode == 2 and "cannot read the policy file" in said and "Usage:" not in said, (commands[argv], said)


def unit_keys(text: str) -> dict[tuple[str, str], list[str]]:
    """Each (section, key) with all its values, normalized: yes/true and no/false alike, lists as words."""
    keys: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, value = line.split("=", 1)
        keys.setdefault((section, key), []).extend({"yes": "true", "no": "false"}.get(value, value).split())
    return keys


# Where the module's units differ from deploy/systemd/ on purpose.
NIXOS_ONLY = {("Service", "X-RestartIfChanged")}  # a timer's run is never restarted by nixos-rebuild
SHIPPED_ONLY = {("Unit", "ConditionPathExists")}  # the module always installs the policy
DESCRIBED_APART = {("Unit", "Description")}  # the run's timer may not be hourly on NixOS


@pytest.mark.parametrize("unit", sorted(p.name for p in (REPO / "deploy" / "systemd").glob("snapsync*")))
def test_units_are_those_of_deploy_systemd_key_by_key(evaluated: dict[str, Report], unit: str) -> None:
    report = evaluated["README.md#1"]  # defaults, drill and check on, a ZFS-capable host
    name, kind = unit.rsplit(".", 1)
    ours = unit_keys(report["services" if kind == "service" else "timers"][name])
    shipped = unit_keys((REPO / "deploy" / "systemd" / unit).read_text())
    if kind == "service":
        env = ours.pop(("Service", "Environment"))
        assert [v for v in env if not v.startswith('"PATH=')] == [f'"{v}"' for v in shipped.pop(("Service", "Environment"))]
        exec_ours, exec_shipped = ours.pop(("Service", "ExecStart")), shipped.pop(("Service", "ExecStart"))
        assert exec_ours[1:] == exec_shipped[1:] and exec_ours[0] == report["snapsyncExe"]
    else:
        for key in DESCRIBED_APART:
            ours.pop(key), shipped.pop(key)
    for key in NIXOS_ONLY:
        ours.pop(key, None)
    for key in SHIPPED_ONLY:
        shipped.pop(key, None)
    assert ours == shipped


# --- what must not evaluate --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BAD)
def test_a_wrong_definition_fails_naming_its_option(case: str) -> None:
    start = time.monotonic()
    proc = nix_eval(f"import ./eval.nix {{ cases = {{ bad = [ {HERE / case} ]; }}; }}")
    print(f"{case}: {time.monotonic() - start:.2f} s\n{proc.stderr.strip()}")
    assert proc.returncode != 0
    assert expected_error(case) in " ".join(proc.stderr.split()), proc.stderr


def test_there_are_negative_cases_for_every_kind_of_mistake() -> None:
    assert len(BAD) >= 15
    texts = " ".join(expected_error(case) for case in BAD)
    for option in ("services.snapsync.policy'", "policy.groups.forge.interval", "services.snapsync.startAt",
                   "receive.user", "receive.authorizedKeys", "policy.targets.b2.key_file"):
        assert option in texts, option


# --- the package and the policy's declared keys -----------------------------------------------------------


def test_the_package_is_built_from_the_package_and_nothing_else() -> None:
    proc = nix_eval("let lib = import ./vendor/nixpkgs-lib/lib; in "
                    "(import ./nixos.nix { inherit lib; }).sourceFiles (import ../../deploy/nixos/source.nix { inherit lib; })")
    assert proc.returncode == 0, proc.stderr
    files = set(json.loads(proc.stdout))
    wanted = {"pyproject.toml", "README.md"} | {
        p.relative_to(REPO).as_posix() for p in (REPO / "snapsync").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and (p.suffix == ".py" or p.parent.name == "data")
    }
    assert files == wanted
    assert not any(f.startswith((".venv", ".hypothesis", "tests/", "build/")) for f in files)


def test_the_package_version_is_pyprojects(evaluated: dict[str, Report]) -> None:
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert evaluated["hosts/full.nix"]["snapsyncExe"].endswith(f"-snapsync-{version}/bin/snapsync")


def test_every_typed_policy_key_is_one_the_schema_has() -> None:
    """The module types a key only as snapsync reads it: each declared key exists in the schema, with
    the same choices where it is an enum."""
    from pydantic import BaseModel

    from snapsync.policy import schema

    proc = nix_eval("import ./options.nix { }")
    assert proc.returncode == 0, proc.stderr
    tree = json.loads(proc.stdout)

    def models(annotation: Any) -> list[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models(arg)]

    def literals(annotation: Any) -> set[object]:
        if typing.get_origin(annotation) is typing.Literal:
            return set(typing.get_args(annotation))
        return {v for arg in typing.get_args(annotation) for v in literals(arg)}

    def compare(node: dict[str, Any], owners: list[type[BaseModel]], at: str) -> None:
        for key, sub in node["keys"].items():
            fields = [m.model_fields[key] for m in owners if key in m.model_fields]
            assert fields, f"{at}.{key} is not a key of {[m.__name__ for m in owners]}"
            if "enum" in sub and key != "version":
                assert set(sub["enum"]) == {v for f in fields for v in literals(f.annotation)}, f"{at}.{key}"
            if "keys" in sub:
                inner = [m for f in fields for m in models(f.annotation)]
                if key == "retention":
                    inner = [schema.RetentionTable]
                compare(sub, inner, f"{at}.{key}")

    compare(tree, [schema.Policy], "policy")
