#!/bin/busybox sh
# /init of the Linux guest of the boot test (scripts/linux-guest/boot.sh puts it in the initramfs; busybox only).
# Loads virtio and the RDMA core, then virtio_rdma; checks that the ib_device registered and that its RoCE GID
# table holds the device's virtual GID once a netdev carries the virtual MAC and address; unloads and reloads the
# module; powers off. Every finding is one "VRDMA-GUEST: key value" line on the console, read by boot.sh.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

say() { echo "VRDMA-GUEST: $*"; }
# The pause lets the console drain the result line before the kernel prints its power-off lines over it.
finish() { say "result $1"; sleep 1; echo o >/proc/sysrq-trigger; sleep 10; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

say "init $(uptime_s)"
while read -r module; do
  insmod "/modules/$module.ko" || { say "insmod-failed $module"; finish fail; }
done </modules/order
say "core-modules-loaded $(uptime_s)"

ip=
module_args=
for word in $(cat /proc/cmdline); do
  case $word in
    vrdma.ip=*) ip=${word#vrdma.ip=} ;;
    vrdma.packed=0) module_args="$module_args packed_ring=0" ;;
    vrdma.debug=1) module_args="$module_args dyndbg=+p" ;;
  esac
done

# The RoCE GID table's non-empty entries: index, GID, type, netdev.
gids() {
  i=0
  while [ $i -lt 16 ]; do
    gid=$(cat "$d/ports/1/gids/$i" 2>/dev/null)
    case $gid in
      ""|0000:0000:0000:0000:0000:0000:0000:0000) ;;
      *) say "$1-gid $i $gid $(cat "$d/ports/1/gid_attrs/types/$i" 2>/dev/null) $(cat "$d/ports/1/gid_attrs/ndevs/$i" 2>/dev/null)" ;;
    esac
    i=$((i + 1))
  done
}

# `what` is load or reload: the same checks both times (a clean unload must allow a second probe).
probe() {
  what=$1
  insmod /modules/virtio_rdma.ko $module_args || { say "$what-insmod-failed"; finish fail; }
  say "$what-loaded $(uptime_s)"
  dev=$(ls /sys/class/infiniband 2>/dev/null | head -n 1)
  [ -n "$dev" ] || { dmesg | tail -n 20; say "$what-no-ib-device"; finish fail; }
  say "$what-ibdev $dev"
  d=/sys/class/infiniband/$dev
  say "$what-node-type $(cat $d/node_type)"
  say "$what-fw $(cat $d/fw_ver)"
  say "$what-port-state $(cat $d/ports/1/state)"
  say "$what-link-layer $(cat $d/ports/1/link_layer)"
}

probe load
dmesg | grep -i 'virtio_rdma\|virtio-rdma' | sed 's/^/VRDMA-GUEST: dmesg /'
mac=$(dmesg | sed -n 's/.*virtual GID .*, MAC \([0-9a-f:]*\),.*/\1/p' | tail -n 1)
say "mac $mac"
# The guest's VPC address on a netdev with the virtual MAC: the driver binds port 1 to it and the RDMA core fills
# the RoCE GID table from its addresses. A veth stands in for the VM's virtio-net interface.
ipr=/sbin/ip # iproute2 (boot.sh copies it in): busybox's ip cannot create a veth pair
$ipr link add veth0 type veth peer name veth1 || say "veth-failed"
$ipr link set veth0 address "$mac" || say "mac-failed"
$ipr link set veth1 up
$ipr link set veth0 up
$ipr addr add "$ip/24" dev veth0 || say "address-failed"
sleep 2
dmesg | grep 'bound to' | sed 's/^/VRDMA-GUEST: dmesg /'
gids load
# The verbs self-test (test/linux-guest/selftest): it runs while it loads and logs one line per step.
insmod /modules/vrdma_selftest.ko || say "selftest-insmod-failed"
rmmod vrdma_selftest
dmesg | sed -n 's/.*VRDMA-SELFTEST: /VRDMA-GUEST: selftest /p'
# User space through libibverbs and the provider (/etc/libibverbs.d/virtio_rdma.driver, boot.sh): the unmodified
# ibv_devinfo, then test/linux-guest/user-verbs.c (an RC QP on itself: RDMA WRITE, CQE, completion event).
mkdir -p /tmp
ibv_devinfo -v -d "$dev" >/tmp/devinfo 2>&1
say "devinfo-rc $?"
sed 's/^/VRDMA-GUEST: devinfo /' /tmp/devinfo
VERBS_LOG_LEVEL=4 timeout 120 user-verbs "$dev" 1 2>&1 | sed 's/^VRDMA-USER: /VRDMA-GUEST: user /'
# Two-sided: the unmodified ibv_rc_pingpong, server and client in this guest, exchanging QP numbers over lo. The
# backend's double completes a SEND's receive on the peer QP but moves no payload, hence no -c (buffer check).
$ipr link set lo up
# pingpong KIND TOOL: server and client of TOOL, their exit codes and output as "KIND-..." lines.
pingpong() {
  timeout 120 "$2" -d "$dev" -g 1 -n 10 -s 64 >/tmp/pp-server 2>&1 &
  pp_server=$!
  sleep 2
  timeout 120 "$2" -d "$dev" -g 1 -n 10 -s 64 127.0.0.1 >/tmp/pp-client 2>&1
  say "$1-client-rc $?"
  wait $pp_server
  say "$1-server-rc $?"
  sed "s/^/VRDMA-GUEST: $1-server /" /tmp/pp-server
  sed "s/^/VRDMA-GUEST: $1-client /" /tmp/pp-client
}
pingpong pingpong ibv_rc_pingpong
rmmod virtio_rdma || { say "unload-failed"; finish fail; }
left=$(ls /sys/class/infiniband 2>/dev/null | wc -l)
say "unloaded devices-left $left"
probe reload
gids reload # the netdev is there before the device this time: bound at probe
rmmod virtio_rdma || { say "unload-failed"; finish fail; }
say "kernel-warnings $(dmesg | grep -c 'BUG:\|WARNING:\|Oops')"
dmesg | grep -A12 'BUG:\|WARNING:\|Oops' | head -n 40 | sed 's/^/VRDMA-GUEST: dmesg /'
finish ok
