# Sourced by init.sh when the kernel command line carries coreos.live.rootfs_url: the
# client reads its arguments as an RHCOS live PXE boot does (dracut brings up the
# network that ip= names and fetches the rootfs; coreos-installer takes the install
# device, the optional image and the ignition), and reports every argument that real
# machine would stumble on. The last line is `E2E-RESULT {json}`; `problems` lists
# what is wrong, `;`-separated, empty when the boot would go through.

problems=""
problem() { problems="$problems$*;"; say "problem: $*"; }

# Every value of one key on the command line (dots in keys are literal).
values() {
    key=$(printf '%s' "$1" | sed 's/\./\\./g')
    tr ' ' '\n' </proc/cmdline | sed -n "s/^$key=//p"
}
count() { values "$1" | grep -c .; }

# An HTTP GET as the initramfs's curl would make it: the status code on stdout, the
# body in $2 (no status when nothing answered).
fetch() {
    rm -f "$2" /tmp/fetch.err
    timeout 60 wget -S -q -O "$2" "$1" 2>/tmp/fetch.err
    sed -n 's/^ *HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' /tmp/fetch.err | tail -n 1
}
sha() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1; }
size() { wc -c 2>/dev/null <"$1" || echo 0; }

say "live cmdline $(cat /proc/cmdline)"

# dracut: one ip= per interface, and a global ip=dhcp next to ip=<nic>:dhcp makes it
# wait for DHCP on every port of a many-NIC machine.
ip_count=$(count ip)
ip_arg=$(values ip | head -n 1)
[ "$ip_count" = 1 ] || problem "$ip_count ip= arguments ($(values ip | tr '\n' ' '))"
want_nic=""
case "$ip_arg" in
*:*) want_nic=${ip_arg%%:*} ;;
esac
if [ -n "$want_nic" ]; then
    [ -e "/sys/class/net/$want_nic" ] || problem "ip=$ip_arg names $want_nic, which is not here"
    nic=$want_nic
fi
[ "$(count rd.neednet)" -le 1 ] || problem "rd.neednet given $(count rd.neednet) times"

# coreos-installer: the live installer has no coreos.inst=yes switch (the legacy
# installer's); each coreos.inst.* key is read once.
[ "$(count coreos.inst)" = 0 ] || problem "coreos.inst=$(values coreos.inst | head -n 1) (legacy installer switch)"
for key in coreos.live.rootfs_url coreos.inst.install_dev coreos.inst.ignition_url; do
    [ "$(count $key)" = 1 ] || problem "$key given $(count $key) times"
done
[ "$(count coreos.inst.image_url)" -le 1 ] || problem "coreos.inst.image_url given more than once"
dev=$(values coreos.inst.install_dev | head -n 1)
case "$dev" in
/dev/?*) ;;
*) problem "coreos.inst.install_dev=$dev is not an absolute /dev path" ;;
esac

# The network dracut brings up: a lease on that NIC only.
mac=$(cat "/sys/class/net/$nic/address" 2>/dev/null)
say "nic $nic $mac"
if ! udhcpc -i "$nic" -f -q -n -t 8 -T 2 -s /bin/lease.sh; then
    echo "E2E-RESULT {\"error\":\"no DHCP lease on $nic\",\"mac\":\"$mac\"}"
    bye
fi
. /tmp/lease.env

# dracut's live module fetches the rootfs before switching root: anything but 200 stops
# the boot in the emergency shell.
rootfs_url=$(values coreos.live.rootfs_url | head -n 1)
rootfs_status=$(fetch "$rootfs_url" /tmp/rootfs)
[ "$rootfs_status" = 200 ] || problem "rootfs $rootfs_url: HTTP ${rootfs_status:-no answer}"
say "rootfs $rootfs_url status=$rootfs_status bytes=$(size /tmp/rootfs)"

image_url=$(values coreos.inst.image_url | head -n 1)
image_status=""
if [ -n "$image_url" ]; then
    image_status=$(fetch "$image_url" /tmp/image)
    [ "$image_status" = 200 ] || problem "image $image_url: HTTP ${image_status:-no answer}"
fi

ign_url=$(values coreos.inst.ignition_url | head -n 1)
ign_status=$(fetch "$ign_url" /tmp/ign)
[ "$ign_status" = 200 ] || problem "ignition $ign_url: HTTP ${ign_status:-no answer}"
say "ignition $ign_url status=$ign_status bytes=$(size /tmp/ign)"

# One write for the whole line, so nothing else on the console lands inside it.
result=$(
    printf '{"mode":"live","mac":"%s","nic":"%s","ip":"%s","ip_args":%s,' \
        "$mac" "$nic" "$ip" "$ip_count"
    printf '"ip_arg":"%s","install_dev":"%s","rootfs_url":"%s","rootfs_status":"%s",' \
        "$ip_arg" "$dev" "$rootfs_url" "$rootfs_status"
    printf '"rootfs_bytes":%s,"rootfs_sha256":"%s","image_url":"%s","image_status":"%s",' \
        "$(size /tmp/rootfs)" "$(sha /tmp/rootfs)" "$image_url" "$image_status"
    printf '"ignition_url":"%s","ignition_status":"%s","ignition_sha256":"%s",' \
        "$ign_url" "$ign_status" "$(sha /tmp/ign)"
    printf '"problems":"%s"}' "$problems"
)
echo "E2E-RESULT $result"
bye
