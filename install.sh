#!/usr/bin/env bash
# Install bootstrap on a Debian 12 machine: run-time packages, a venv in ./.venv, the `bootstrap`
# command in /usr/local/bin, and (when systemd is PID 1) the tool's own units.
#   ./install.sh         the tool (as root; from a user's shell: sudo ./install.sh)
#   ./install.sh --dev   the tool plus everything the tests need
# Idempotent: a second run changes nothing that is already in place.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

step() { printf '==> %s\n' "$*" >&2; }
fail() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
trap 'fail "step failed at line $LINENO: $BASH_COMMAND"' ERR

[ "$(id -u)" -eq 0 ] || fail "must run as root: run ./install.sh${*:+ $*} as root, or sudo ./install.sh${*:+ $*}"
[ -r /etc/debian_version ] || fail "this installer supports Debian 12 (bookworm) only"

# Run-time: runc, dbus and catatonit (the containers' init) for system containers; python3-venv;
# gcc + headers + gi/cairo development files to build PyGObject (pydbus imports gi).
runtime_pkgs=(ca-certificates runc catatonit dbus iproute2 python3 python3-venv python3-dev gcc
  pkg-config libgirepository1.0-dev libcairo2-dev libdbus-1-dev gir1.2-glib-2.0 tar
  # signature verification: gpgv checks simple signatures, gpg dearmors ASCII-armored keys
  gpgv gpg
  # `bootstrap demo`: a systemd machine (debootstrap, systemd-nspawn, zstd cache), its images,
  # and the registry it serves them from
  debootstrap systemd-container zstd busybox-static docker-registry)
# Tests: a real registry, reference tools to compare with, a systemd node, an offline CRI daemon.
dev_pkgs=(skopeo umoci jq openssl apache2-utils containerd tini sudo time
  # bench/: reflinked checkouts on XFS and btrfs loop devices, the fleet's merging site cache
  xfsprogs btrfs-progs nginx)

pkgs=("${runtime_pkgs[@]}")
[ "$dev" -eq 1 ] && pkgs+=("${dev_pkgs[@]}")

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || fail "apt-get update failed: check the network and /etc/apt/sources.list"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || fail "apt-get install failed for: ${missing[*]}"
else
  step "Debian packages already installed"
fi

venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  step "creating $venv with /usr/bin/python3"
  /usr/bin/python3 -m venv "$venv" || fail "could not create the venv (is python3-venv installed?)"
fi
step "installing bootstrap into $venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null \
  || fail "could not upgrade pip in $venv"
target="$here"
[ "$dev" -eq 1 ] && target="$here[dev]"
# editable: a path entry in a .pth, no import hook (pyproject's package-dir; the hook would cost
# ~13 ms of start-up in every bootstrap process)
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$target" \
  || fail "pip install of the project failed (PyGObject needs libgirepository1.0-dev and libcairo2-dev)"

policy=/etc/containers/policy.json
if [ ! -e "$policy" ]; then
  # containers-common's default: accept anything. Lock it down with docs/trust.md.
  install -d -m 0755 /etc/containers
  printf '{\n    "default": [\n        {\n            "type": "insecureAcceptAnything"\n        }\n    ]\n}\n' \
    > "$policy"
  step "wrote $policy (accepts any image; see docs/trust.md to require signatures)"
else
  step "keeping the existing $policy"
fi

# The command goes on PATH through one symlink; the units run /usr/local/bin/bootstrap too.
link=/usr/local/bin/bootstrap
want="$venv/bin/bootstrap"
why="so that 'bootstrap' is on PATH and the units' ExecStart=$link runs this checkout"
if [ -L "$link" ] && [ "$(readlink "$link")" = "$want" ]; then
  step "keeping $link -> $want"
elif [ -L "$link" ]; then
  old="$(readlink "$link")"
  ln -sfn "$want" "$link"
  step "re-pointed $link from $old to $want ($why; rerun that checkout's install.sh to switch back)"
elif [ -e "$link" ]; then
  fail "$link exists and is not a symlink: move it away and rerun (install.sh links $want there $why)"
else
  ln -s "$want" "$link"
  step "linked $link -> $want ($why)"
fi

# The documentation the units' Documentation= lines and the command's help point at.
doc=/usr/local/share/doc/bootstrap
install -d -m 0755 "$doc"
install -m 0644 "$here"/README.md "$here"/docs/*.md "$doc"/
step "installed the documentation into $doc"

if [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
  if compgen -G "$here/units/*.service" >/dev/null; then
    step "installing units into /etc/systemd/system"
    install -m 0644 "$here"/units/*.service "$here"/units/*.timer /etc/systemd/system/
    systemctl daemon-reload
    # services with an [Install] section are enabled; the auto-update timer is enabled by
    # `bootstrap up` when the node manifest asks for it (auto_update: {timer: true})
    for u in "$here"/units/*.service; do
      grep -q '^\[Install\]' "$u" && systemctl enable "$(basename "$u")" >/dev/null
    done
  fi
else
  step "systemd is not PID 1 here: skipping unit installation"
fi
step "done: $(/usr/local/bin/bootstrap --version)"
