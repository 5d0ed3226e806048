#!/bin/sh
# Installs what building vmig-ebpf's BPF programs needs (Debian 12). Idempotent: packages already
# installed are left alone and nothing is downloaded then. Run as root (CI: `sudo ebpf/install-deps.sh`).
#
#   clang-19       compiles bpf/vmig.bpf.c (-target bpf); any clang >= 14 works, see build.rs
#   libbpf-dev     bpf/bpf_helpers.h (SEC, map macros, helper prototypes)
#   linux-libc-dev linux/bpf.h, linux/userfaultfd.h (UAPI headers; normally already present)
#   bpftool        not needed to build: for inspecting loaded programs (`bpftool prog list`)
set -eu

PKGS="clang-19 libbpf-dev linux-libc-dev bpftool"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    echo "vmig-ebpf build dependencies already installed: $PKGS"
    exit 0
fi

echo "installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update
# shellcheck disable=SC2086
apt-get install -y --no-install-recommends $missing
