#!/usr/bin/env bash
# Installs what netoken needs on a Debian machine: the BPF toolchain, the
# network tools the tests and demo drive, a bpffs mount, and the project's
# virtualenv with netoken installed in it.  Idempotent: it only calls apt when
# a package is missing, and pip only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  clang-19 llvm-19 libbpf-dev libbpf1 bpftool
  iproute2 ethtool tcpdump tshark hping3 netsniff-ng iperf3 curl
  nftables iptables iputils-ping systemd
)

if [ "$(id -u)" -ne 0 ]; then
  echo "netoken: installing dependencies needs root (apt, bpffs, network namespaces); run as root" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "netoken: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # tshark asks whether non-root users may capture; the default (no) is fine.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    apt-get install -y -qq python3-venv >/dev/null
    rm -rf .venv
    "$PY" -m venv .venv
  fi
fi
stamp=.venv/.netoken-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
