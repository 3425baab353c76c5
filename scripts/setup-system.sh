#!/usr/bin/env bash
# Install the Debian packages LineInspect needs, only those that are missing.
#   scripts/setup-system.sh runtime   -> what `lineinspect demo` needs
#   scripts/setup-system.sh test      -> plus what the test suite talks to
# With CI=true a package that cannot be installed fails the run.
set -euo pipefail
profile="${1:-runtime}"

pkgs=(python3-venv python3-dev)
declare -A bins=()
if [[ "$profile" == "test" ]]; then
  # binary -> Debian package
  bins=(
    [mosquitto]=mosquitto
    [mosquitto_pub]=mosquitto-clients
    [mbpoll]=mbpoll
    [chromium]=chromium
    [socat]=socat
    [systemd-analyze]=systemd
    [fc-list]=fontconfig
  )
fi

missing=()
for b in "${!bins[@]}"; do
  if ! command -v "$b" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$b" ]]; then
    missing+=("${bins[$b]}")
  fi
done
if [[ "$profile" == "test" ]]; then
  # PostgreSQL server binaries (the ingest test starts its own throw-away cluster);
  # Debian keeps them off PATH under /usr/lib/postgresql/<major>/bin.
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
  # A CJK font so the Simplified Chinese panel renders in the browser tests.
  compgen -G '/usr/share/fonts/truetype/wqy/wqy-microhei.ttc' >/dev/null || missing+=(fonts-wqy-microhei)
fi
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=("${pkgs[@]}")
fi

if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

echo "setup-system: installing Debian packages: ${missing[*]}"
SUDO=""
if [[ "$(id -u)" != "0" ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup-system: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"

# Re-check: a package that installed nothing usable is a failure, never a skip.
if [[ "$profile" == "test" ]] && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  echo "setup-system: PostgreSQL server binaries are still missing after apt-get install" >&2
  exit 1
fi
for b in "${!bins[@]}"; do
  if ! command -v "$b" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$b" ]]; then
    echo "setup-system: '$b' is still missing after apt-get install" >&2
    exit 1
  fi
done
