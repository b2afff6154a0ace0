#!/bin/sh
# udhcpc's event script for a storm machine: put the address on eth0 and keep what
# the server said next to the machine's result file ($OUT, from the client script).
case "$1" in
bound | renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    {
        echo "ip='$ip'"
        echo "boot_file='$boot_file'"
        echo "siaddr='$siaddr'"
        echo "serverid='$serverid'"
    } >"$OUT.lease"
    ;;
deconfig)
    ip addr flush dev "$interface"
    ;;
esac
exit 0
