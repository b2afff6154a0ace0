#!/bin/sh
# udhcpc's event script in the e2e client: keep what the server said, configure the NIC.
case "$1" in
bound | renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    ip link set "$interface" up
    for r in $router; do ip route add default via "$r" dev "$interface" 2>/dev/null; break; done
    {
        echo "ip='$ip'"
        echo "subnet='$subnet'"
        echo "router='$router'"
        echo "dns='$dns'"
        echo "domain='$domain'"
        echo "hostname='$hostname'"
        echo "serverid='$serverid'"
        echo "lease='$lease'"
    } >/tmp/lease.env
    ;;
deconfig)
    ip link set "$interface" up
    ip addr flush dev "$interface"
    ;;
esac
exit 0
