#!/usr/bin/env bash
# One command for the demo: installs redis-server if missing, builds the
# daemon and the plugins, and runs `llmq demo` (private Redis, mock provider,
# daemon, mixed load, live progress, per-key table).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""; if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  echo "==> installing redis-server"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server
fi
echo "==> building llmq and its plugins (release)"
cargo build --release -q -p llmq -p llmq-plugin-openai -p llmq-plugin-anthropic -p llmq-plugin-gemini
export LLMQ_LOG="${LLMQ_LOG:-warn}"
exec target/release/llmq demo --plugins-dir target/release "$@"
