#!/usr/bin/env bash
# Installs the system packages a make target needs (Debian/Ubuntu, as root), or says
# exactly what to install. Usage: ensure-system-packages.sh test|bench
set -euo pipefail

case "${1:-}" in
  test)  need=(curl) ;;                       # the suite starts everything else itself
  bench) need=(wrk nginx haproxy) ;;
  *) echo "usage: $0 test|bench" >&2; exit 2 ;;
esac

missing=()
for cmd in "${need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian starts nginx as a service on install; the benchmark runs its own.
  if printf '%s\n' "${missing[@]}" | grep -qx nginx; then
    (service nginx stop || systemctl stop nginx) >/dev/null 2>&1 || true
  fi
else
  echo "missing: ${missing[*]} -- install them first, e.g.: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
