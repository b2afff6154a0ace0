#!/bin/sh
# PID 1 of the e2e client OS (a Debian kernel + this busybox initramfs).
# Does what an installer does with the network before it writes a disk: takes a
# lease, resolves the cluster names, fetches its ignition and talks to the API VIP
# through the load balancer. Every step prints an E2E-STEP line; the last line is
# `E2E-RESULT {json}` for the test to parse. Then it powers the VM off. An RHCOS live PXE
# command line (coreos.live.rootfs_url) is checked by live.sh instead.
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
# Kernel messages (link up, ...) on the console would land inside the result line.
dmesg -n 1

say() { echo "E2E-STEP $*"; }
bye() { sync; poweroff -f; sleep 30; }

if grep -q 'e2e.probe' /proc/cmdline; then
    echo "E2E-PROBE-OK $(cut -d' ' -f1 /proc/uptime)"
    bye
fi

for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m" || say "insmod $m failed"
done
ip link set lo up

# The NIC appears once virtio_net has probed it: wait (bounded).
nic=""
i=0
while [ $i -lt 50 ] && [ -z "$nic" ]; do
    for dev in /sys/class/net/*; do
        name=${dev##*/}
        [ "$name" = lo ] || { nic=$name; break; }
    done
    [ -n "$nic" ] || sleep 0.2
    i=$((i + 1))
done
[ -n "$nic" ] || { echo 'E2E-RESULT {"error":"no network interface"}'; bye; }

# An RHCOS live PXE command line: check it as dracut and coreos-installer read it.
if grep -q 'coreos.live.rootfs_url=' /proc/cmdline; then
    . /bin/live.sh
fi

mac=$(cat "/sys/class/net/$nic/address")
say "nic $nic $mac"

# A lease; lease.sh writes what the server said to /tmp/lease.env and configures the NIC.
if ! udhcpc -i "$nic" -f -q -n -t 8 -T 2 -s /bin/lease.sh; then
    echo "E2E-RESULT {\"error\":\"no DHCP lease\",\"mac\":\"$mac\"}"
    bye
fi
. /tmp/lease.env
echo "E2E-LEASE ip=$ip subnet=$subnet router=$router dns=$dns domain=$domain hostname=$hostname serverid=$serverid lease=$lease"
ns=${dns%% *}

# DNS through the appliance (busybox nslookup talks to the server given, no resolv.conf).
a_of() { nslookup "$1" "$ns" 2>&1 | awk '/^Name:/ {n=1} n && /^Address/ {print $NF; exit}'; }
api_int=$(a_of "api-int.$domain")
apps=$(a_of "console-openshift-console.apps.$domain")
srv=$(nslookup -type=srv "_etcd-server-ssl._tcp.$domain" "$ns" 2>&1 \
    | sed -n 's/.*service = \(.*\)$/\1/p' | sort | tr '\n' ';')
ptr=$(nslookup "$ip" "$ns" 2>&1 | sed -n 's/.*name = \([^ ]*\).*/\1/p' | head -n 1)
say "dns api-int=$api_int apps=$apps ptr=$ptr srv=$srv"

# The ignition URL from the kernel command line, as coreos-installer would read it.
url=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^coreos.inst.ignition_url=//p' | head -n 1)
rm -f /tmp/ign
timeout 30 wget -q -O /tmp/ign "$url"
ign_rc=$?
ign_bytes=$(wc -c </tmp/ign 2>/dev/null || echo 0)
ign_sha=$(sha256sum /tmp/ign 2>/dev/null | cut -d' ' -f1)
say "ignition $url rc=$ign_rc bytes=$ign_bytes"

# The API VIP through the load balancer: an HTTPS request to the backend behind it.
api=$(timeout 30 wget -q -O - --no-check-certificate "https://$api_int:6443/e2e?mac=$mac" 2>&1 \
    | tr -d '"\\\r\n' | head -c 200)
say "api $api"

printf 'E2E-RESULT {"mac":"%s","ip":"%s","subnet":"%s","router":"%s","dns":"%s",' \
    "$mac" "$ip" "$subnet" "$router" "$dns"
printf '"domain":"%s","hostname":"%s","serverid":"%s","api_int":"%s","apps":"%s",' \
    "$domain" "$hostname" "$serverid" "$api_int" "$apps"
printf '"srv":"%s","ptr":"%s","ignition_url":"%s","ignition_rc":%s,' \
    "$srv" "$ptr" "$url" "$ign_rc"
printf '"ignition_bytes":%s,"ignition_sha256":"%s","api":"%s"}\n' \
    "$ign_bytes" "$ign_sha" "$api"
bye
