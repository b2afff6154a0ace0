#!/bin/sh
# One machine of the boot storm, run inside its own network namespace (busybox sh).
# What a PXE ROM does before the kernel runs, with real clients: a DHCP lease
# (udhcpc, announcing itself as a PXE client of architecture $ARCH), the boot loader
# the server named in its answer by TFTP (from the server it named), then the
# kernel and initramfs over HTTP. Writes one line to $OUT: `ok key=value ...` or
# `fail <step> ...`. Each step is bounded by `timeout`.
#   storm_client.sh OUT GO LEASE_SCRIPT HTTP_BASE KERNEL INITRAMFS ARCH
OUT=$1 GO=$2 LEASE=$3 BASE=$4 KERNEL=$5 INITRAMFS=$6 ARCH=$7
export OUT
now() { cut -d' ' -f1 /proc/uptime; }
fail() { echo "fail $* t=$(now)" >"$OUT.tmp" && mv "$OUT.tmp" "$OUT"; exit 1; }

ip link set lo up
ip link set eth0 up
# Wait for the start signal (a file), at most 120 s.
i=0
while [ ! -e "$GO" ]; do
    i=$((i + 1))
    [ $i -gt 6000 ] && fail wait
    usleep 20000
done
t0=$(now)

# PXE clients say what they are in option 60 and option 93 (0 BIOS, 7 UEFI x64).
vendor="PXEClient:Arch:0000$ARCH:UNDI:002001"
timeout 60 udhcpc -i eth0 -f -q -n -t 15 -T 2 -s "$LEASE" -V "$vendor" \
    -x "0x5d:000$ARCH" >"$OUT.udhcpc" 2>&1 || fail dhcp
. "$OUT.lease"
t1=$(now)
[ -n "$boot_file" ] || fail bootfile ip=$ip
timeout 60 tftp -g -b 1468 -r "$boot_file" -l /dev/null "$siaddr" || fail tftp ip=$ip
t2=$(now)
timeout 300 wget -q -O /dev/null "$BASE/$KERNEL" || fail kernel ip=$ip
t3=$(now)
timeout 300 wget -q -O /dev/null "$BASE/$INITRAMFS" || fail initramfs ip=$ip
t4=$(now)
echo "ok ip=$ip boot_file=$boot_file siaddr=$siaddr start=$t0 lease=$t1 loader=$t2 kernel=$t3 initramfs=$t4" \
    >"$OUT.tmp" && mv "$OUT.tmp" "$OUT"
