#!/usr/bin/env bash
# The one command that runs every test. It installs what the suite needs on a
# fresh Debian machine, then runs the whole workspace suite. CI (.ci/run)
# calls exactly this.
#
# Every tool a test needs is installed here, and a test whose tool is missing
# fails (it never passes by skipping):
#   redis-server           every queue and end-to-end test
#   python3 + redis-py     the Python producer example (tests/producers/python)
#   chromium               the dashboard tests
#   systemd-analyze        the unit-file checks (systemd/llmq.service)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
apt_updated=""
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $* missing and there is no apt-get to install it with" >&2
    exit 1
  fi
  if [ -z "$apt_updated" ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@"
}

command -v redis-server >/dev/null 2>&1 || { echo "==> installing redis-server"; apt_install redis-server redis-tools; }
command -v redis-cli >/dev/null 2>&1 || { echo "==> installing redis-tools"; apt_install redis-tools; }
command -v python3 >/dev/null 2>&1 || { echo "==> installing python3"; apt_install python3 python3-pip; }
if ! python3 -c 'import redis' >/dev/null 2>&1; then
  echo "==> installing redis-py"
  python3 -m pip install -q redis 2>/dev/null \
    || python3 -m pip install -q --break-system-packages redis 2>/dev/null \
    || apt_install python3-redis
  python3 -c 'import redis'
fi
if [ -z "${LLMQ_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  echo "==> installing chromium (dashboard tests)"
  apt_install chromium
fi
command -v systemd-analyze >/dev/null 2>&1 || { echo "==> installing systemd (systemd-analyze)"; apt_install systemd; }

echo "==> cargo test --workspace"
cargo test --workspace "$@"
