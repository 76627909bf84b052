"""deploy/systemd units: well-formed for systemd, complete, and livable for the Python stack.

systemd is not PID 1 on the test machines, so no unit is started here. Instead:
- `systemd-analyze verify` checks each unit (a copy whose ExecStart names an existing
  executable, as verify insists on), and `systemd-analyze security --offline` scores it;
- a parser checks every directive the deployment depends on;
- the units' Environment= and LoadCredential= are fed through the real config loader;
- the Python stack runs under the two restrictions most likely to break it: kernel
  MDWE (what MemoryDenyWriteExecute=yes enforces) and a seccomp allow-list built from
  the units' own SystemCallFilter= lines (needs Debian's python3-seccomp; skipped,
  saying so, without it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import RecordingClient, free_port, port_open, wait_until
from waystation.config import AgentConfig, BrokerConfig, ServerConfig, load_config
from waystation.errors import ConfigError
from waystation.service import check_state_directory

REPO = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO / "deploy" / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None)
VENV_BIN = "/opt/waystation/.venv/bin/waystation"
INSTANCE = "van-12"   # the instance name used for the template


@dataclass(frozen=True)
class UnitSpec:
    """What one unit file must say."""

    file: str
    part: str                  # agent / server / broker
    config: str                # the --config path
    state: str                 # StateDirectory=
    credential: str | None     # LoadCredential= for the MQTT password

    @property
    def path(self) -> Path:
        """The unit file in the repository."""
        return UNIT_DIR / self.file


UNITS = [
    UnitSpec("waystation-agent.service", "agent", "/etc/waystation/agent.toml",
             "waystation/agent", "/etc/waystation/credentials/agent-mqtt-password"),
    UnitSpec("waystation-server.service", "server", "/etc/waystation/server.toml",
             "waystation/server", "/etc/waystation/credentials/server-mqtt-password"),
    UnitSpec("waystation-broker.service", "broker", "/etc/waystation/broker.toml",
             "waystation/broker", None),
    UnitSpec("waystation-agent@.service", "agent", "/etc/waystation/agent-%i.toml",
             "waystation/agent-%i", "/etc/waystation/credentials/agent-%i-mqtt-password"),
]
MODELS: dict[str, type[AgentConfig] | type[ServerConfig] | type[BrokerConfig]] = {
    "agent": AgentConfig, "server": ServerConfig, "broker": BrokerConfig}

# Directive -> the exact value every unit must give it ([Service] section).
REQUIRED = {
    "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30",
    "Restart": "on-failure", "RestartSec": "2", "TimeoutStopSec": "30",
    "KillSignal": "SIGTERM", "UMask": "0077",
    "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "NoNewPrivileges": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
    "RestrictNamespaces": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native", "CapabilityBoundingSet": "",
}

needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                   reason="systemd-analyze is not installed (package systemd)")


# ------------------------------------------------------------------ unit file parsing

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """`section -> [(key, value), ...]` in file order (keys may repeat, as in systemd)."""
    sections: Unit = {}
    current: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"line {number}: not 'Key=value' in a section"
        assert not value.endswith("\\"), f"line {number}: no continuation lines, please"
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every value given to `key` in `section`."""
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str | None:
    """The effective value of a single-valued `key` (the last one, as systemd reads it)."""
    found = values(unit, section, key)
    return found[-1] if found else None


def environment(unit: Unit) -> dict[str, str]:
    """The Environment= assignments of [Service]."""
    env: dict[str, str] = {}
    for line in values(unit, "Service", "Environment"):
        for item in shlex.split(line):
            name, _, val = item.partition("=")
            env[name] = val
    return env


def load(spec: UnitSpec) -> Unit:
    """The parsed unit file."""
    return parse_unit(spec.path.read_text())


# ------------------------------------------------------------------ directive checks

@pytest.mark.parametrize("spec", UNITS, ids=lambda s: s.file)
def test_unit_has_the_required_directives(spec: UnitSpec) -> None:
    """Every unit is Type=notify with the watchdog, restart policy and full sandbox."""
    unit = load(spec)
    for key, expected in REQUIRED.items():
        assert value(unit, "Service", key) == expected, f"{spec.file}: {key}"
    families = value(unit, "Service", "RestrictAddressFamilies") or ""
    assert set(families.split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    filters = values(unit, "Service", "SystemCallFilter")
    assert filters and filters[0] == "@system-service"
    assert all(f.startswith("~") for f in filters[1:]), "later filters may only take away"
    assert value(unit, "Service", "AmbientCapabilities") in (None, "")
    assert value(unit, "Service", "DynamicUser") == "yes" or value(unit, "Service", "User")
    assert value(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("spec", UNITS, ids=lambda s: s.file)
def test_unit_runs_its_part_on_its_state_directory(spec: UnitSpec) -> None:
    """ExecStart runs `waystation PART run --config ...`; data_dir is the StateDirectory."""
    unit = load(spec)
    assert value(unit, "Service", "ExecStart") == (
        f"{VENV_BIN} {spec.part} run --config {spec.config}")
    assert value(unit, "Service", "StateDirectory") == spec.state
    env = environment(unit)
    # data_dir comes from the config file alone (the part checks it is the
    # StateDirectory): an override here would make the service use another store than
    # the commands run by hand with the same --config.
    assert f"WAYSTATION_{spec.part.upper()}__DATA_DIR" not in env
    credentials = values(unit, "Service", "LoadCredential")
    if spec.credential is None:
        assert credentials == []
    else:
        assert credentials == [f"mqtt-password:{spec.credential}"]


@pytest.mark.parametrize("spec", UNITS, ids=lambda s: s.file)
def test_unit_environment_and_credentials_load_as_config(spec: UnitSpec, tmp_path: Path) -> None:
    """The unit's Environment= and credential layout give the config loader what it needs."""
    unit = load(spec)
    state_root = tmp_path / "state"
    env = {name: val.replace("%S", str(state_root)).replace("%i", INSTANCE)
           for name, val in environment(unit).items()}
    model = MODELS[spec.part]
    config_file = tmp_path / f"{spec.part}.toml"
    state_dir = state_root / spec.state.replace("%i", INSTANCE)
    env["STATE_DIRECTORY"] = str(state_dir)  # what systemd sets for StateDirectory=
    toml = f'data_dir = "{state_dir}"\n' + ("" if spec.part == "broker" else (
        '[mqtt]\npassword_file = "${CREDENTIALS_DIRECTORY}/mqtt-password"\n'))
    config_file.write_text(toml)
    if spec.credential is not None:
        # What systemd does for LoadCredential=mqtt-password:...: a private directory
        # holding the file under its credential name, named by $CREDENTIALS_DIRECTORY.
        creds = tmp_path / "credentials"
        creds.mkdir(mode=0o700)
        (creds / "mqtt-password").write_text("s3cret\n")
        env["CREDENTIALS_DIRECTORY"] = str(creds)
    config: AgentConfig | ServerConfig | BrokerConfig = load_config(model, config_file, env)
    assert Path(config.data_dir) == state_dir
    check_state_directory(config.data_dir, env, spec.part)  # accepted
    with pytest.raises(ConfigError, match=f"set data_dir = \"{state_dir}\"") as refused:
        check_state_directory(tmp_path / "elsewhere", env, spec.part)
    # A second server's copied unit still naming the first's StateDirectory: the fix
    # is the unit's, not to point data_dir at the first server's store.
    assert "set that unit's StateDirectory= to it" in str(refused.value)
    assert config.log.format == "json"
    if isinstance(config, AgentConfig | ServerConfig):
        assert config.mqtt.resolved_password(env) == "s3cret"


def test_the_template_and_the_single_agent_unit_agree() -> None:
    """waystation-agent@.service differs from waystation-agent.service only by instance."""
    single, template = load(UNITS[0]), load(UNITS[3])
    ignore = {"Description", "ExecStart", "StateDirectory", "Environment", "LoadCredential",
              "After"}
    def body(unit: Unit) -> set[tuple[str, str, str]]:
        return {(s, k, v) for s, items in unit.items() for k, v in items if k not in ignore}
    assert body(single) == body(template)


# ------------------------------------------------------------------ systemd-analyze

def _verifiable_copy(spec: UnitSpec, directory: Path, executable: str) -> Path:
    """The unit with ExecStart's program replaced by `executable` (arguments kept)."""
    text = spec.path.read_text()
    assert text.count(f"ExecStart={VENV_BIN} ") == 1
    copy = directory / spec.file
    copy.write_text(text.replace(f"ExecStart={VENV_BIN} ", f"ExecStart={executable} "))
    return copy


def _verify(path: Path) -> tuple[int, list[str]]:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    # A template is verified as the instance "i" (waystation-agent@i.service).
    names = {path.name, str(path), path.name.replace("@.", "@i.")}
    return result.returncode, [line for line in lines if any(n in line for n in names)]


@needs_analyze
@pytest.mark.parametrize("spec", UNITS, ids=lambda s: s.file)
def test_systemd_analyze_verify_is_clean(spec: UnitSpec, tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to say about the unit."""
    executable = shutil.which("true") or "/bin/true"
    code, complaints = _verify(_verifiable_copy(spec, tmp_path, executable))
    assert complaints == []
    assert code == 0


@needs_analyze
def test_systemd_analyze_verify_would_catch_mistakes(tmp_path: Path) -> None:
    """The verify check is not vacuous: a typo, a bad value and a missing binary show up."""
    executable = shutil.which("true") or "/bin/true"
    copy = _verifiable_copy(UNITS[0], tmp_path, executable)
    broken = (copy.read_text().replace("ProtectClock=yes", "ProtectClok=yes")
              .replace("RestartSec=2", "RestartSec=soon"))
    copy.write_text(broken)
    _, complaints = _verify(copy)
    assert any("ProtectClok" in line for line in complaints)
    assert any("soon" in line for line in complaints)
    missing = _verifiable_copy(UNITS[1], tmp_path, "/nonexistent/waystation")
    code, complaints = _verify(missing)
    assert code != 0 and any("/nonexistent/waystation" in line for line in complaints)


@needs_analyze
@pytest.mark.parametrize("spec", UNITS, ids=lambda s: s.file)
def test_security_exposure_is_low(spec: UnitSpec, tmp_path: Path) -> None:
    """`systemd-analyze security --offline` rates every unit's exposure at most 2.0 ("OK")."""
    assert SYSTEMD_ANALYZE is not None
    copy = _verifiable_copy(spec, tmp_path, shutil.which("true") or "/bin/true")
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager",
                             str(copy)], capture_output=True, text=True, timeout=60,
                            check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if found is None and "offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no --offline security: {result.stderr.strip()}")
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0, result.stdout


# ------------------------------------------------------------------ the stack in the sandbox

# Runs in a child process: restrict it the way systemd would, then exercise the stack.
_SANDBOX = textwrap.dedent('''
    import ctypes, errno, json, os, sys
    mode, allowed_file = sys.argv[1], sys.argv[2]
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0                  # PR_SET_NO_NEW_PRIVS
    if "mdwe" in mode:
        assert libc.prctl(65, 1, 0, 0, 0) == 0              # PR_SET_MDWE, REFUSE_EXEC_GAIN
    if "seccomp" in mode:
        sys.path.append("/usr/lib/python3/dist-packages")
        import seccomp
        sys.path.remove("/usr/lib/python3/dist-packages")
        rules = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
        for name in json.load(open(allowed_file)):
            try:
                rules.add_rule(seccomp.ALLOW, name)
            except (RuntimeError, ValueError, OSError):
                pass                        # not a system call on this architecture
        rules.load()
    target = sys.argv[3:]
    if target:                              # run a module as the unit would
        import runpy
        sys.argv = target
        runpy.run_module(target[0], run_name="__main__", alter_sys=True)
        raise SystemExit(0)
''')

_WORKLOAD = textwrap.dedent('''
    import asyncio, mmap, socket, ssl, tempfile, threading
    import lmdb, orjson, pydantic, structlog, psycopg, paho.mqtt.client, amqtt.broker
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    import waystation.config, waystation.systemd
    work = tempfile.mkdtemp()
    key = AESGCM.generate_key(bit_length=256)
    sealed = AESGCM(key).encrypt(b"n" * 12, b"record", b"ad")
    assert AESGCM(key).decrypt(b"n" * 12, sealed, b"ad") == b"record"
    ec.generate_private_key(ec.SECP256R1()).sign(b"x", ec.ECDSA(hashes.SHA256()))
    ssl.create_default_context()
    env = lmdb.open(work + "/db", map_size=1 << 24, max_dbs=2)
    db = env.open_db(b"outbox")
    with env.begin(write=True) as txn:
        txn.put(b"1", orjson.dumps({"n": 1}), db=db)
    env.sync(True)
    with env.begin() as txn:
        assert orjson.loads(txn.get(b"1", db=db)) == {"n": 1}
    env.close()
    class Model(pydantic.BaseModel):
        n: int
    assert Model.model_validate_json(b'{"n": 2}').n == 2
    server = socket.create_server(("127.0.0.1", 0))
    def echo():
        conn, _ = server.accept()
        conn.sendall(conn.recv(16))
        conn.close()
    threading.Thread(target=echo).start()
    client = socket.create_connection(server.getsockname())
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.sendall(b"ping")
    assert client.recv(16) == b"ping"
    async def tick():
        await asyncio.sleep(0.01)
        return 1
    assert asyncio.run(tick()) == 1
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(work + "/notify")
    assert waystation.systemd.ready(env={"NOTIFY_SOCKET": work + "/notify"})
    assert notify.recv(64) == b"READY=1"
    report = {}
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        report["wx_mmap"] = "allowed"
    except OSError as exc:
        report["wx_mmap"] = exc.errno
    try:
        os.chown(work, os.getuid(), os.getgid())
        report["chown"] = "allowed"
    except OSError as exc:
        report["chown"] = exc.errno
    print("REPORT " + json.dumps(report))
''')


def _syscall_groups() -> dict[str, list[str]]:
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run([SYSTEMD_ANALYZE, "syscall-filter", "--no-pager"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.strip())
    return groups


def _expand(item: str, groups: dict[str, list[str]], seen: set[str] | None = None) -> set[str]:
    if not item.startswith("@"):
        return {item}
    seen = set() if seen is None else seen
    if item in seen:
        return set()
    seen.add(item)
    out: set[str] = set()
    for member in groups[item]:
        out |= _expand(member, groups, seen)
    return out


def allowed_syscalls(unit: Unit) -> set[str]:
    """The system calls a unit's SystemCallFilter= lines allow, as systemd combines them."""
    groups = _syscall_groups()
    allowed: set[str] = set()
    for line in values(unit, "Service", "SystemCallFilter"):
        deny = line.startswith("~")
        names: set[str] = set()
        for item in line.lstrip("~").split():
            names |= _expand(item, groups)
        allowed = allowed - names if deny else allowed | names
    return allowed


def _mdwe_supported() -> bool:
    """Linux >= 6.3 lets a process opt into MDWE (what MemoryDenyWriteExecute= sets up)."""
    result = subprocess.run(
        [sys.executable, "-c", "import ctypes,sys; l=ctypes.CDLL(None, use_errno=True);"
         "l.prctl(38,1,0,0,0); sys.exit(0 if l.prctl(65,1,0,0,0) == 0 else 1)"],
        check=False, timeout=60)
    return result.returncode == 0


def _seccomp_missing() -> str | None:
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.append('/usr/lib/python3/dist-packages');"
         "import seccomp"], capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        return ("python3-seccomp (libseccomp's Python binding, Debian package python3-seccomp) "
                "is not importable by this Python: " + result.stderr.strip().splitlines()[-1])
    return None


def _run_sandboxed(mode: str, tmp_path: Path, allowed: set[str]) -> dict[str, object]:
    allowed_file = tmp_path / "allowed.json"
    allowed_file.write_text(json.dumps(sorted(allowed)))
    script = _SANDBOX + _WORKLOAD
    result = subprocess.run([sys.executable, "-c", script, mode, str(allowed_file)],
                            capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("REPORT "))
    report: dict[str, object] = json.loads(line.removeprefix("REPORT "))
    return report


def test_stack_runs_with_memory_deny_write_execute(tmp_path: Path) -> None:
    """Under kernel MDWE (MemoryDenyWriteExecute=yes) the whole Python stack still works."""
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    report = _run_sandboxed("mdwe", tmp_path, set())
    assert report["wx_mmap"] == 13          # EACCES: the restriction was really in force


@needs_analyze
def test_stack_runs_under_the_units_system_call_filter(tmp_path: Path) -> None:
    """With the units' SystemCallFilter= as a seccomp allow-list the stack still works."""
    missing = _seccomp_missing()
    if missing:
        pytest.skip(missing)
    filters = {tuple(values(load(spec), "Service", "SystemCallFilter")) for spec in UNITS}
    assert len(filters) == 1, "the units should share one system call filter"
    allowed = allowed_syscalls(load(UNITS[0]))
    assert {"read", "write", "mmap", "futex", "socket", "connect", "fsync"} <= allowed
    assert "chown" not in allowed and "setrlimit" not in allowed
    mode = "seccomp+mdwe" if _mdwe_supported() else "seccomp"
    report = _run_sandboxed(mode, tmp_path, allowed)
    assert report["chown"] == 1             # EPERM: the filter was really in force


@needs_analyze
def test_embedded_broker_serves_inside_the_sandbox(tmp_path: Path) -> None:
    """`broker.embedded` (the broker unit's program) serves devices under the sandbox."""
    missing = _seccomp_missing()
    if missing:
        pytest.skip(missing)
    from broker.embedded.passwords import write_password_entry

    write_password_entry(tmp_path / "passwd", "van-1", "pw-van-1")
    write_password_entry(tmp_path / "passwd", "waystation-server", "pw-server")
    allowed_file = tmp_path / "allowed.json"
    allowed_file.write_text(json.dumps(sorted(allowed_syscalls(load(UNITS[2])))))
    port = free_port()
    mode = "seccomp+mdwe" if _mdwe_supported() else "seccomp"
    log = (tmp_path / "broker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SANDBOX, mode, str(allowed_file), "broker.embedded",
         "--host", "127.0.0.1", "--port", str(port), "--password-file",
         str(tmp_path / "passwd"), "--data-dir", str(tmp_path / "data")],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    server = RecordingClient(port, "server-1", "waystation-server", "pw-server")
    device = RecordingClient(port, "van-1", "van-1", "pw-van-1")
    try:
        wait_until(lambda: proc.poll() is not None or port_open("127.0.0.1", port), 30,
                   message=lambda: (tmp_path / "broker.log").read_text(errors="replace"))
        assert proc.poll() is None, (tmp_path / "broker.log").read_text(errors="replace")
        assert server.connect() == "Success"
        assert server.subscribe("waystation/+/up") == 1
        assert device.connect() == "Success"
        device.publish("waystation/van-1/up", b"from-the-sandbox")
        server.wait_for("waystation/van-1/up", b"from-the-sandbox")
    finally:
        device.close()
        server.close()
        proc.terminate()
        proc.wait(30)
        log.close()

