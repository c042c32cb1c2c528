#!/usr/bin/env bash
# Installs the system packages a make target needs (Debian/Ubuntu, as root), or says
# exactly what to install. Usage: ensure-system-packages.sh test|bench
set -euo pipefail

# command:package pairs
case "${1:-}" in
  test)  need=(promtool:prometheus prometheus:prometheus   # the metrics tests
               redis-server:redis-server redis-cli:redis-tools   # the cache tests
               curl:curl openssl:openssl   # the TLS tests check with real clients
               chromium:chromium chromedriver:chromium-driver) ;;   # the dashboard test
  bench) need=(wrk:wrk nginx:nginx haproxy:haproxy) ;;
  *) echo "usage: $0 test|bench" >&2; exit 2 ;;
esac

missing=()
for pair in "${need[@]}"; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    case " ${missing[*]-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian starts these as services on install; tests and benchmarks run their own.
  for service in nginx prometheus haproxy; do
    if printf '%s\n' "${missing[@]}" | grep -qx "$service"; then
      (service "$service" stop || systemctl stop "$service") >/dev/null 2>&1 || true
    fi
  done
else
  echo "missing: ${missing[*]} -- install them first, e.g.: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
