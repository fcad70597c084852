#!/usr/bin/env bash
# The one command that runs every test: installs what the suite needs on a
# fresh Debian machine (redis-server; python3 + redis-py for the producer
# example; chromium for the dashboard test, optional), then runs the whole
# workspace suite. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
apt_install() {
  if command -v apt-get >/dev/null 2>&1; then
    if [ -z "${LLMQ_APT_UPDATED:-}" ]; then
      $SUDO apt-get update -qq || true
      export LLMQ_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@"
  else
    return 1
  fi
}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "==> installing redis-server"
  apt_install redis-server
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "==> installing python3"
  apt_install python3 python3-pip || echo "warning: python3 not installed; the Python producer test will say why it is skipped"
fi
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import redis' >/dev/null 2>&1; then
  echo "==> installing redis-py"
  python3 -m pip install -q redis 2>/dev/null \
    || python3 -m pip install -q --break-system-packages redis 2>/dev/null \
    || apt_install python3-redis \
    || echo "warning: redis-py not installed; the Python producer test will say why it is skipped"
fi
if [ -z "${LLMQ_SKIP_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing chromium (for the dashboard end-to-end test)"
  apt_install chromium || echo "warning: chromium not installed; the dashboard test will say why it is skipped"
fi

echo "==> cargo test --workspace"
cargo test --workspace "$@"
