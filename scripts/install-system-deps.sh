#!/usr/bin/env bash
# Debian packages sarvit's demo and tests use offline:
#   dataset-fashion-mnist    -> /usr/share/datasets/fashion-mnist (IDX .gz files)
#   tuxpaint-stamps-default  -> /usr/share/tuxpaint/stamps (PNG cut-outs for `sarvit data stamps`)
# and the browser a test renders a study's report.html with (headless, no network needed):
#   chromium                 -> /usr/bin/chromium
set -euo pipefail

packages=(dataset-fashion-mnist tuxpaint-stamps-default chromium)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "sarvit: the Debian packages ${missing[*]} are needed, but this system has no apt-get." >&2
    echo "        Fashion-MNIST can also be given as a folder: sarvit train --data fashion_mnist --data-root DIR" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
        echo "sarvit: run as root (or install sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi
echo "sarvit: installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y --no-install-recommends "${missing[@]}"; then
    $sudo apt-get update
    $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi
