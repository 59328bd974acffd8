#!/usr/bin/env bash
# Debian packages the end-to-end tests use, installed once when missing (as root with apt-get).
# Without root or apt-get this prints why and exits 0: the tests that need a package then
# try again themselves and skip with that reason.
set -u
# openssl: the nginx test's self-signed certificate; curl: its HTTP/2 check; systemd-analyze,
# setpriv and useradd: the install test (tests/e2e/test_install.py).
want=(nginx:nginx-light chromium:chromium dwebp:webp avifdec:libavif-bin openssl:openssl curl:curl
      systemd-analyze:systemd setpriv:util-linux useradd:passwd make:make)
missing=()
for pair in "${want[@]}"; do
  binary=${pair%%:*}; package=${pair#*:}
  command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "test packages missing (${missing[*]}) and no root apt-get: the tests needing them will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt_install() { apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"; }
echo "installing test packages: ${missing[*]}" >&2
apt_install >/dev/null 2>&1 || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null 2>&1; apt_install >/dev/null 2>&1; } \
  || echo "apt-get install ${missing[*]} failed; the tests needing them will skip" >&2
exit 0
