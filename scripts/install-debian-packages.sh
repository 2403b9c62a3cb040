#!/usr/bin/env bash
# Installs the independent Debian peers the tests run against (DCMTK, dicom3tools,
# Orthanc, Prometheus, tshark, openssl for the TLS test CA, chromium to render the HTML
# conformance report) when any is missing.
# Only root can; others get a hint.
set -euo pipefail
packages=(dcmtk dicom3tools orthanc prometheus tshark openssl socat chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
  exit 0
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
