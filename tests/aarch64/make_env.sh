#!/usr/bin/env bash
# An emulated Linux aarch64 device environment on an x86 machine, for the device tests (never for timings:
# emulation is 7-300x slower than the real thing, and unevenly so).
#
#   tests/aarch64/make_env.sh OUT        ->  OUT/python, an aarch64 CPython 3.11 (Debian bookworm, as on a
#                                            Raspberry Pi) with the `edge` extra's aarch64 wheels
#
# Debian's qemu-user-static runs the aarch64 binaries (no binfmt_misc needed); debootstrap's first stage fetches
# bookworm's python3 and what it needs, and each .deb is unpacked with dpkg-deb -x (the second stage would take
# a quarter of an hour emulated); pip on the host installs the aarch64 wheels into a folder of their own.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: make_env.sh OUT}")
ROOT="$OUT/root"
SITE="$OUT/site-packages"
HERE=$(cd "$(dirname "$0")/../.." && pwd)
PIP=${PIP:-pip3}

for tool in qemu-aarch64-static debootstrap dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "error: $tool is missing (apt-get install qemu-user-static debootstrap)" >&2; exit 2; }
done
# The mirror apt already uses (no other host may be reachable).
MIRROR=$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
MIRROR=${MIRROR:-$(sed -n 's/^deb \(http[^ ]*debian\)\/* bookworm .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 bookworm "$OUT.tmp/root" "$MIRROR" \
    > "$OUT.tmp/debootstrap.log" 2>&1 || { tail -20 "$OUT.tmp/debootstrap.log" >&2; exit 1; }
for deb in "$OUT.tmp"/root/var/cache/apt/archives/*.deb; do
    dpkg-deb -x "$deb" "$OUT.tmp/root"
done
# qemu passes the host's x86 /proc/cpuinfo through, on which onnxruntime's CPU detection crashes at import;
# qemu resolves paths under -L first, so the emulated CPU gets an ARM one (Cortex-A72, a Raspberry Pi 4's).
mkdir -p "$OUT.tmp/root/proc"
for i in $(seq 0 $(( $(nproc) - 1 ))); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$i"
done > "$OUT.tmp/root/proc/cpuinfo"

# The edge extra's requirements and pytest, as aarch64 wheels for CPython 3.11.
REQS=$(cd "$HERE" && python3 - <<'EOF'
import configparser
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
options = cfg["options"]
lines = options["install_requires"].split("\n") + cfg["options.extras_require"]["edge"].split("\n")
print(" ".join(line.strip() for line in lines if line.strip() and not line.strip().startswith("#")))
EOF
)
# shellcheck disable=SC2086
"$PIP" install -q --target "$OUT.tmp/site-packages" --only-binary=:all: --implementation cp --python-version 3.11 \
    --abi cp311 --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform any \
    $REQS ${ONNXRUNTIME:+"onnxruntime==$ONNXRUNTIME"} pytest

# A test that starts sys.executable needs a script as argv[0]: qemu's -0 passes the wrapper's own path.
cat > "$OUT.tmp/python" <<EOF
#!/bin/sh
export PYTHONPATH="$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
exec qemu-aarch64-static -L "$ROOT" -cpu cortex-a72 -0 "\$0" "$ROOT/usr/bin/python3.11" "\$@"
EOF
chmod +x "$OUT.tmp/python"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
# paths inside the wrapper were written for OUT already
"$OUT/python" -c "import platform, onnxruntime, numpy; print('aarch64 device environment:', platform.machine(), 'CPython', platform.python_version(), '| onnxruntime', onnxruntime.__version__, '| numpy', numpy.__version__)"
