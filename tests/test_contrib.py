"""contrib/: the Wireshark dissector, systemd units, Kubernetes manifests, Grafana dashboard.

Each artifact is checked by the tool that will consume it (tshark, systemd-analyze,
the Kubernetes OpenAPI schemas) and against netoken itself: the real CLI parser
accepts every command they run, the real config loader accepts the config they
ship, and the capability sets they grant are enough for the real programs.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from netoken import config as nconfig
from netoken import layout, token
from netoken.cli import build_parser
from netoken.marker import Marker

from .conftest import Lab, uid, write_key
from .pkt import LINUX_SYN_OPTS, options_of_len, parse, rebuild_with_option, syn
from .test_cli import forget

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
NETOKEN = Path(sys.executable).parent / "netoken"  # the venv's console script
INSTALLED = "/usr/local/bin/netoken"
CONFIG = "/etc/netoken/netoken.toml"


def marker_config(directory: Path) -> nconfig.Config:
    write_key(directory)
    path = directory / "netoken.toml"
    path.write_text(f"""
[[key]]
id = 1
file = "{directory / "1.key"}"

[[policy]]
name = "web"
destinations = ["198.51.100.0/24", "2001:db8:100::/64"]
key = 1

[guard]
[[guard.protect]]
destinations = ["198.51.100.0/24"]
keys = [1]
""")
    return nconfig.load(path)


# ---------------------------------------------------------------- Wireshark

LUA = CONTRIB / "wireshark" / "netoken.lua"
FIELDS = ("kind", "len", "exid", "mode", "key_id", "epoch", "nonce", "tag", "token")


def tshark(pcap: Path, *args: str) -> list[list[str]]:
    r = subprocess.run(
        ["tshark", "-n", "-X", f"lua_script:{LUA}", "-r", str(pcap), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    # Lua errors do not fail tshark; they show on stderr.
    assert r.returncode == 0 and "Lua" not in r.stderr and "rror" not in r.stderr, r.stderr
    return [line.split("\t") for line in r.stdout.splitlines()]


def expected(option: bytes | None) -> list[str]:
    """What -T fields must print for FIELDS, from the Python reference."""
    if option is None:
        return [""] * len(FIELDS)
    t = token.decode(option)
    row = [str(t.kind), str(len(option)), f"0x{t.exid:04x}", t.mode]
    if t.mode == "mac":
        return row + [str(t.key_id), str(t.epoch_low), t.nonce.hex(), t.tag.hex(), ""]
    return row + ["", "", "", "", f"0x{t.token:016x}"]


@pytest.fixture(scope="module")
def dissector_capture(tmp_path_factory) -> tuple[Path, list[bytes | None]]:
    """Frames from the real marker and the reference, and the option each carries."""
    d = tmp_path_factory.mktemp("lua")
    cfg = marker_config(d)
    with Marker.load() as m:
        m.configure(cfg)
        marker_out = [
            m.prog.test_run(syn(dst=dst, options=opts, vlans=v)).data_out
            for dst, opts, v in (
                ("198.51.100.7", LINUX_SYN_OPTS, 0),
                ("2001:db8:100::7", options_of_len(24), 2),
            )
        ]
    # The marker drew the nonce: take its option from the frame it produced.
    frames = list(marker_out)
    options: list[bytes | None] = [token.find_options(parse(f).options)[0] for f in marker_out]
    static = token.encode_static(253, 0x6E74, 0x1122334455667788)
    kind254 = token.build_mac_option(
        bytes(16), key_id=7, epoch=0x1234, daddr="192.0.2.9", dport=80, kind=254
    )
    for opt in (static, kind254):
        frames.append(rebuild_with_option(syn(options=LINUX_SYN_OPTS), opt))
        options.append(opt)
    frames.append(syn(options=LINUX_SYN_OPTS))
    options.append(None)
    path = d / "netoken.pcap"
    wrpcap(str(path), [Ether(f) for f in frames])
    return path, options


def test_dissector_fields_equal_the_reference(dissector_capture):
    path, options = dissector_capture
    rows = tshark(path, "-T", "fields", *(x for f in FIELDS for x in ("-e", f"netoken.{f}")))
    assert rows == [expected(o) for o in options]


def test_dissector_leaves_other_experiments_to_wireshark(tmp_path, dissector_capture):
    other = bytes((253, 8)) + (0x1234).to_bytes(2, "big") + b"abcd"
    path = tmp_path / "other.pcap"
    wrpcap(str(path), [Ether(rebuild_with_option(syn(), other))])
    rows = tshark(path, "-T", "fields", "-e", "netoken.exid", "-e", "tcp.options.experimental.exid")
    assert rows == [["", "0x1234"]]
    # and the ExID preference moves netoken's own option to the built-in dissector
    path, _ = dissector_capture
    rows = tshark(path, "-o", "netoken.exid:0x1234", "-T", "fields", "-e", "netoken.key_id")
    assert all(r == [""] for r in rows)


def test_dissector_flags_a_bad_length(tmp_path):
    bad = bytes((253, 14)) + (0x6E74).to_bytes(2, "big") + bytes(10)
    path = tmp_path / "bad.pcap"
    wrpcap(str(path), [Ether(rebuild_with_option(syn(), bad + b"\x01\x01"))])
    rows = tshark(
        path, "-Y", "netoken.bad_len", "-T", "fields", "-e", "netoken.len", "-e", "netoken.key_id"
    )
    assert rows == [["14", ""]]


# ---------------------------------------------------------------- systemd

UNITS = CONTRIB / "systemd"
UNIT_FILES = (
    "netoken-mark@.service",
    "netoken-guard@.service",
    "netoken-exporter.service",
    "netoken-agent.service",
)


def unit_settings(name: str) -> dict[str, list[str]]:
    """KEY -> values of a unit file (comments dropped, repeated keys kept)."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def netoken_argv(command: str, iface: str = "eth0") -> list[str]:
    """A unit's or a script's netoken command line, as the CLI will receive it."""
    for var, value in (
        ("%I", iface),
        ("%i", iface),
        ('"$i"', iface),
        ("${NETOKEN_EXPORTER_LISTEN}", "0.0.0.0:9917"),
        ("$NETOKEN_GUARD_ARGS", ""),
    ):
        command = command.replace(var, value)
    argv = shlex.split(command)
    assert Path(argv[0]).name == "netoken", command
    return argv[1:]


def test_units_verify_with_systemd_analyze(tmp_path):
    for name in UNIT_FILES:
        text = (UNITS / name).read_text()
        assert INSTALLED in text, f"{name} must run the installed {INSTALLED}"
        # systemd-analyze checks that ExecStart= exists: point it at this checkout's.
        (tmp_path / name).write_text(text.replace(INSTALLED, str(NETOKEN)))
    instances = [
        tmp_path / "netoken-mark@eth0.service",
        tmp_path / "netoken-guard@eth0.service",
        tmp_path / "netoken-exporter.service",
        tmp_path / "netoken-agent.service",
    ]
    r = subprocess.run(
        ["systemd-analyze", "verify", *map(str, instances)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    # Unknown keys and bad values are only warnings: any output is a failure.
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr


def test_unit_commands_are_real_cli_commands():
    parser = build_parser()
    seen = {}
    for name in UNIT_FILES:
        s = unit_settings(name)
        assert s["Type"] in (["oneshot"], ["exec"])
        for key in ("ExecStart", "ExecStop", "ExecReload"):
            for cmd in s.get(key, []):
                if cmd == "/bin/kill -HUP $MAINPID":  # the agent reloads on SIGHUP
                    seen[(name, key)] = ("SIGHUP", None)
                    continue
                args = parser.parse_args(netoken_argv(cmd))
                seen[(name, key)] = (args.object, getattr(args, "verb", None))
                if getattr(args, "config", None):
                    assert args.config == CONFIG
    assert seen[("netoken-mark@.service", "ExecStart")] == ("mark", "attach")
    assert seen[("netoken-mark@.service", "ExecStop")] == ("mark", "detach")
    assert seen[("netoken-guard@.service", "ExecStart")] == ("guard", "attach")
    assert seen[("netoken-guard@.service", "ExecStop")] == ("guard", "detach")
    assert seen[("netoken-exporter.service", "ExecStart")] == ("exporter", None)
    assert seen[("netoken-agent.service", "ExecStart")] == ("agent", None)
    assert seen[("netoken-agent.service", "ExecReload")] == ("SIGHUP", None)
    # loopback unless the operator says otherwise: /metrics has no authentication
    assert unit_settings("netoken-exporter.service")["Environment"] == [
        "NETOKEN_EXPORTER_LISTEN=127.0.0.1:9917"
    ]
    for name in UNIT_FILES[:2]:
        s = unit_settings(name)
        assert s["RemainAfterExit"] == ["yes"]
        assert "network-online.target" in " ".join(s["After"])


def bounding_set(name: str) -> list[str]:
    (caps,) = unit_settings(name)["CapabilityBoundingSet"]
    return caps.split()


def test_unit_capabilities_exist_and_are_minimal():
    known = set(
        subprocess.run(
            ["setpriv", "--list-caps"], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    for name in UNIT_FILES:
        caps = bounding_set(name)
        assert caps and all(c.startswith("CAP_") and c[4:].lower() in known for c in caps), caps
    assert bounding_set("netoken-mark@.service") == ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
    assert bounding_set("netoken-guard@.service") == bounding_set("netoken-mark@.service") + [
        "CAP_SYS_ADMIN"
    ]
    assert bounding_set("netoken-exporter.service") == ["CAP_BPF"]
    assert bounding_set("netoken-agent.service") == bounding_set("netoken-guard@.service")


def with_caps(caps: list[str], netns: str, *argv: str) -> subprocess.CompletedProcess:
    """ARGV in NETNS with only CAPS, as CapabilityBoundingSet= leaves root.

    nsenter rather than `ip netns exec`, which remounts /sys and hides bpffs.
    """
    keep = ",".join(["-all"] + [f"+{c[4:].lower()}" for c in caps])
    return subprocess.run(
        [
            "nsenter",
            f"--net=/run/netns/{netns}",
            "setpriv",
            "--bounding-set",
            keep,
            "--inh-caps",
            "-all",
            "--",
            *argv,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.fixture
def veth_ns():
    lab = Lab()
    try:
        ns = lab.ns("caps")
        iface = uid("ntc")
        subprocess.run(
            ["ip", "-n", ns, "link", "add", iface, "type", "veth", "peer", "name", iface + "p"],
            check=True,
        )
        for dev in (iface, iface + "p"):
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        yield ns, iface
    finally:
        lab.close()


def test_marker_unit_capabilities_are_enough(tmp_path, veth_ns):
    ns, iface = veth_ns
    marker_config(tmp_path)
    caps = bounding_set("netoken-mark@.service")
    cfg = str(tmp_path / "netoken.toml")
    try:
        for argv in (
            ["mark", "attach", iface, "-c", cfg],  # load + attach
            ["mark", "attach", iface, "-c", cfg],  # replace our own
            ["apply", iface, "-c", cfg],
        ):
            r = with_caps(caps, ns, str(NETOKEN), *argv)
            assert r.returncode == 0, (argv, r.stderr)
        # what the exporter reads: status and counters of the pinned programs
        for argv in (["status", iface, "--json"], ["stats", iface, "--json"]):
            r = with_caps(bounding_set("netoken-exporter.service"), ns, str(NETOKEN), *argv)
            assert r.returncode == 0 and iface in r.stdout, (argv, r.stderr)
    finally:
        r = with_caps(caps, ns, str(NETOKEN), "mark", "detach", iface)
    assert r.returncode == 0 and "removed prog" in r.stdout, r.stderr


def test_agent_unit_capabilities_are_enough(tmp_path, veth_ns):
    """The agent with exactly its unit's bounding set: attaches marker and
    guard, watches files, links and the clock, stops cleanly."""
    ns, iface = veth_ns
    marker_config(tmp_path)
    cfg = tmp_path / "netoken.toml"
    cfg.write_text(cfg.read_text() + f'[agent]\nmark = ["{iface}"]\nguard = ["{iface}p"]\n')
    keep = ",".join(["-all"] + [f"+{c[4:].lower()}" for c in bounding_set("netoken-agent.service")])
    proc = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{ns}",
            "setpriv",
            "--bounding-set",
            keep,
            "--inh-caps",
            "-all",
            "--",
            str(NETOKEN),
            "agent",
            "-c",
            str(cfg),
            "--detach-on-exit",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        while "msg=watching" not in (line := proc.stderr.readline()):
            assert line, "".join(lines)
            lines.append(line)
        assert not any("level=error" in x for x in lines), lines
        assert sum("msg=attached" in x for x in lines) == 2, lines
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, rest
    finally:
        proc.kill()
    assert rest.count("msg=detached") == 2 and "level=error" not in rest, rest


GUARD_SCRIPT = """
import sys
from netoken import config
from netoken.guard import Guard, attached, detach
cfg = config.load(sys.argv[1])
for _ in range(2):  # the second attach replaces our own program
    with Guard.load(replay_cache=cfg.guard.replay_cache) as g:
        g.configure(cfg)
        g.attach(sys.argv[2], "generic")
assert attached(sys.argv[2]) is not None
assert detach(sys.argv[2])
"""


def test_guard_unit_capabilities_are_enough(tmp_path, veth_ns):
    ns, iface = veth_ns
    marker_config(tmp_path)
    cfg = str(tmp_path / "netoken.toml")
    caps = bounding_set("netoken-guard@.service")
    r = with_caps(caps, ns, sys.executable, "-c", GUARD_SCRIPT, cfg, iface)
    assert r.returncode == 0, r.stderr
    # The unit's own command line: --hook auto puts it at TC ingress on a veth.
    try:
        for verb in (
            ("guard", "attach", iface, "-c", cfg, "--hook", "auto"),
            ("guard", "attach", iface, "-c", cfg, "--hook", "auto"),
            ("guard", "detach", iface),
        ):
            r = with_caps(caps, ns, str(NETOKEN), *verb)
            assert r.returncode == 0, r.stderr
        assert "tc ingress" in r.stdout
    finally:
        forget(iface)


# ---------------------------------------------------------------- Kubernetes

K8S = CONTRIB / "k8s"
# The oldest release the manifest promises to work on, and the newest the
# validator knows.  CAP_BPF and CAP_PERFMON need Linux >= 5.8 on the nodes.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())


def manifest() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((K8S / "daemonset.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifest_validates_against_the_kubernetes_schema(version):
    docs = manifest()
    assert set(docs) == {"Namespace", "ConfigMap", "DaemonSet", "Service"}
    for doc in docs.values():
        # strict: an unknown (misspelt) field is an error, not silently dropped
        kubernetes_validate.validate(doc, version, strict=True)


def test_daemonset_is_minimal_and_complete():
    docs = manifest()
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["capabilities"]["add"] == ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]
    assert sc["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert volumes["bpffs"]["hostPath"]["path"] == "/sys/fs/bpf" == mounts["bpffs"]["mountPath"]
    assert volumes["keys"]["secret"]["defaultMode"] == 0o400
    assert volumes["config"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert mounts["config"]["mountPath"] == "/etc/netoken"
    assert mounts["run"]["mountPath"] == "/run/netoken"
    # subPath mounts never see the kubelet's ..data swap: the agent would miss updates
    assert not any("subPath" in m for m in c["volumeMounts"])
    (port,) = c["ports"]
    assert port["name"] == "metrics"
    svc = docs["Service"]["spec"]
    assert svc["ports"][0]["name"] == "metrics" and svc["ports"][0]["targetPort"] == "metrics"
    labels = docs["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= labels.items()
    # the image's entrypoint (the agent) runs; no shell loop, no preStop detach
    assert "command" not in c and "lifecycle" not in c
    # metrics on the node's own address, from the downward API
    env = {e["name"]: e for e in c["env"]}
    assert env["NETOKEN_NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert c["args"][c["args"].index("--metrics") + 1] == "$(NETOKEN_NODE_IP):9917"
    assert "0.0.0.0" not in json.dumps(docs)


def test_servicemonitor_points_at_the_metrics_port():
    sm = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    svc = manifest()["Service"]
    assert sm["kind"] == "ServiceMonitor" and sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]


def test_manifest_config_and_commands_are_accepted_by_netoken(tmp_path):
    docs = manifest()
    text = docs["ConfigMap"]["data"]["netoken.toml"]
    keys = tmp_path / "keys"
    keys.mkdir()
    write_key(keys)
    cfg = nconfig.parse(text.replace("/run/secrets/netoken", str(keys)), path="configmap")
    assert cfg.guard is not None and cfg.keys[1].file == keys / "1.key"
    assert cfg.agent is not None and cfg.agent.guard == ("eth0",) and cfg.agent.metrics is None

    # what the container runs: the image's ENTRYPOINT with the manifest's args,
    # $(VAR) expanded as the kubelet does
    c = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    argv = [a.replace("$(NETOKEN_NODE_IP)", "10.0.0.5") for a in c["args"]]
    entrypoint = containerfile_json("ENTRYPOINT")
    args = build_parser().parse_args([*entrypoint[1:], *argv])
    assert Path(entrypoint[0]).name == "netoken"
    assert (args.object, args.config, args.metrics) == ("agent", CONFIG, "10.0.0.5:9917")
    assert not args.detach_on_exit  # pods restarting must not leave a gap


# ---------------------------------------------------------------- Containerfile

CONTAINERFILE = ROOT / "Containerfile"


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(
            line
            for line in CONTAINERFILE.read_text().splitlines()
            if not line.lstrip().startswith("#")
        ),
    )
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def containerfile_json(instruction: str) -> list[str]:
    (value,) = [v for i, v in containerfile() if i == instruction]
    return json.loads(value)  # exec form: no shell between the runtime and netoken


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins, rest in containerfile():
        if ins == "FROM":
            out.append([])
        if out:
            out[-1].append((ins, rest))
    return out


def test_containerfile_builds_bpf_and_wheel_then_runs_the_agent():
    build, final = stages()
    args = dict(v.split("=", 1) for i, v in containerfile() if i == "ARG")
    assert args["DEBIAN"].startswith("debian:")
    assert build[0] == ("FROM", "${DEBIAN} AS build") and final[0] == ("FROM", "${DEBIAN}")
    build_run = " ".join(v for i, v in build if i == "RUN")
    for needed in ("clang-19", "libbpf-dev", "linux-libc-dev", "make -s bpf", "pip wheel"):
        assert needed in build_run, needed
    final_run = " ".join(v for i, v in final if i == "RUN")
    for needed in ("libbpf1", "iproute2", "/wheels/*.whl"):
        assert needed in final_run, needed
    assert "clang" not in final_run  # nothing to compile with at run time
    assert ("COPY", "--from=build /wheels /wheels") in final
    assert [v for i, v in final if i == "USER"] == ["0:0"]

    # the entrypoint is the agent, and the default command is a real invocation
    entrypoint, cmd = containerfile_json("ENTRYPOINT"), containerfile_json("CMD")
    assert entrypoint == ["netoken", "agent"]
    args = build_parser().parse_args([*entrypoint[1:], *cmd])
    assert (args.object, args.config) == ("agent", CONFIG)

    # podman reads the capabilities the image needs from this label: the
    # manifest grants exactly those
    label = re.search(
        r'io\.containers\.capabilities="([^"]+)"', " ".join(v for i, v in final if i == "LABEL")
    )
    c = manifest()["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    assert label and label.group(1).split(",") == c["securityContext"]["capabilities"]["add"]


def test_containerfile_packages_exist_in_debian():
    """Every package the stages install is a real Debian package (this host
    is Debian; the lookup is the local apt index)."""
    names = set()
    for ins, rest in containerfile():
        m = re.search(r"apt-get install -y --no-install-recommends ([^&]+)", rest)
        if ins == "RUN" and m:
            names |= set(m.group(1).split())
    assert {"clang-19", "libbpf-dev", "libbpf1", "python3", "iproute2"} <= names
    r = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *sorted(names)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = set(re.findall(r"^Package: (\S+)$", r.stdout, re.MULTILINE))
    assert found == names, names - found


def test_dockerignore_keeps_the_build_context_to_sources():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "netoken/bpf/*.o"):
        assert entry in ignored


# ---------------------------------------------------------------- Grafana

GRAFANA = CONTRIB / "grafana"
# The exporter's label contract (contrib/grafana/METRICS holds the names).
LABELS = {
    "netoken_marker_packets_total": {"interface", "reason"},
    "netoken_marker_actions_total": {"interface", "action"},
    "netoken_syn_marked_total": {"interface"},
    "netoken_guard_packets_total": {"interface", "reason"},
    "netoken_guard_syn_verdicts_total": {"interface", "verdict"},
    "netoken_guard_actions_total": {"interface", "action"},
    "netoken_guard_replay_cache_errors_total": {"interface"},
    "netoken_guard_key_syns_total": {"interface", "key_id", "result"},
    "netoken_events_total": {"interface", "role", "result"},
    "netoken_attached": {"interface", "role"},
    "netoken_exporter_read_errors_total": set(),
    "netoken_key_info": {"interface", "role", "key_id", "fingerprint"},
    "netoken_info": {"version"},
    "netoken_agent_config_errors_total": set(),
    "netoken_agent_applies_total": {"cause"},
}
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
VALUES = {
    # "room_from_ts" is the marker's action once its counter exists
    ("netoken_marker_packets_total", "reason"): set(layout.MARK_PACKET_REASONS),
    ("netoken_marker_actions_total", "action"): set(layout.MARK_ACTIONS) | {"room_from_ts"},
    ("netoken_guard_packets_total", "reason"): set(
        layout.GUARD_VERDICTS + layout.GUARD_PASS_REASONS
    ),
    ("netoken_guard_actions_total", "action"): set(layout.GUARD_ACTIONS_TAKEN),
    ("netoken_events_total", "role"): {"marker", "guard"},
    ("netoken_events_total", "result"): set(layout.GUARD_EVENTS.values()),
    ("netoken_agent_applies_total", "cause"): {"config", "schedule"},
    ("netoken_guard_syn_verdicts_total", "verdict"): set(layout.GUARD_VERDICTS),
    ("netoken_guard_key_syns_total", "result"): {"ok", "bad"},
    ("netoken_attached", "role"): {"marker", "guard"},
}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
}
_TOKEN = re.compile(
    r"(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)\s*(?P<sel>\{[^}]*\})?\s*(?P<call>\()?"
    r'|"(?:[^"\\]|\\.)*"|\[[^\]]*\]|.',
    re.DOTALL,
)
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def metric_names() -> list[str]:
    return (GRAFANA / "METRICS").read_text().split()


def promql_selectors(expr: str) -> tuple[list[tuple[str, str]], set[str]]:
    """([(metric, selector text)], grouping labels) of a PromQL expression.

    Small on purpose: enough for dashboard queries (no subqueries or
    string literals outside selectors), and it fails loudly on anything else.
    """
    grouping = {lbl.strip() for m in _GROUPING.finditer(expr) for lbl in m.group(2).split(",")}
    rest = _GROUPING.sub(" ", expr)
    found = []
    for m in _TOKEN.finditer(rest):
        name = m.group("name")
        if not name or m.group("call") or name in _KEYWORDS:
            continue  # a function, an aggregation, a keyword, or punctuation
        found.append((name, m.group("sel") or ""))
    return found, grouping - {""}


def dashboard_queries() -> list[str]:
    dash = json.loads((GRAFANA / "netoken.json").read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
            assert m, var
            exprs.append(m.group(1))
            metric = promql_selectors(m.group(1))[0][0][0]
            assert m.group(2) in LABELS[metric] | TARGET_LABELS, var["name"]
    return exprs


def test_metrics_file_is_the_label_contract():
    from netoken import exporter

    names = metric_names()
    assert len(names) == len(set(names)) and set(names) == set(LABELS)
    for f in exporter.FAMILIES + exporter.AGENT_FAMILIES:
        assert set(f.labels) == LABELS[f.name], f.name
    assert all(re.fullmatch(r"netoken_[a-z0-9_]+", n) for n in names)
    counters = [
        n for n in names if n not in ("netoken_attached", "netoken_key_info", "netoken_info")
    ]
    assert all(n.endswith("_total") for n in counters)


def test_every_dashboard_query_names_exported_metrics():
    exported = set(metric_names())
    used: set[str] = set()
    exprs = dashboard_queries()
    assert len(exprs) > 10
    for expr in exprs:
        selectors, grouping = promql_selectors(expr)
        assert selectors, expr
        metrics = set()
        for metric, sel in selectors:
            assert metric in exported, f"{metric!r} in {expr!r} is not in contrib/grafana/METRICS"
            metrics.add(metric)
            for label, op, value in _MATCHER.findall(sel):
                assert label in LABELS[metric] | TARGET_LABELS, (metric, label, expr)
                allowed = VALUES.get((metric, label))
                if allowed and not value.startswith("$"):
                    assert set(value.split("|")) <= allowed, (metric, label, value)
        labels = set().union(*(LABELS[m] for m in metrics)) | TARGET_LABELS
        assert grouping <= labels, (grouping, expr)
        used |= metrics
    assert used == exported, f"metrics no panel shows: {exported - used}"


def test_promql_parser_catches_what_it_should():
    sel, grouping = promql_selectors(
        'sum by (reason) (rate(netoken_x_total{reason=~"a|b"}[$__rate_interval])) '
        "/ on (instance) group_left count(up) or vector(0)"
    )
    assert sel == [("netoken_x_total", '{reason=~"a|b"}'), ("up", "")]
    assert grouping == {"reason", "instance"}
    assert promql_selectors("netoken_info")[0] == [("netoken_info", "")]


def test_dashboard_structure():
    dash = json.loads((GRAFANA / "netoken.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys()
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"]
    assert dash["uid"] == "netoken"
