#!/bin/busybox sh
# /init of the nested Linux guest (scripts/linux-guest/nested.sh puts it in its initramfs; test/rxe/linux-guest.test.ts
# boots it inside the soft-RoCE test host). Loads virtio, the RDMA core and virtio_rdma, gives the device's netdev
# (a veth carrying the virtual MAC) the VPC address and the guest's NIC its link address, then connects a shell to
# the test: `nc HOST PORT -e /bin/sh`, so the test runs the guest's commands (the unmodified verbs tools, rmmod) one
# at a time and reads their output and exit codes. When the test closes the shell, the guest powers off.
# Kernel command line: vrdma.ip=VIRTUAL_IP vrdma.link=ADDRESS/PREFIX vrdma.shell=HOST:PORT [vrdma.packed=0]
# Progress goes to the console as "VRDMA-GUEST: key value" lines, with the seconds since boot.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

# How often the guest tries to reach the test's shell listener (one try a second) before it gives up.
SHELL_TRIES=600

say() { echo "VRDMA-GUEST: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
finish() { say "result $1 $(uptime_s)"; sleep 1; echo o >/proc/sysrq-trigger; sleep 10; }

say "init $(uptime_s)"
while read -r module; do
  insmod "/modules/$module.ko" || { say "insmod-failed $module"; finish fail; }
done </modules/order
say "core-modules-loaded $(uptime_s)"

ip= link= shell= module_args=
for word in $(cat /proc/cmdline); do
  case $word in
    vrdma.ip=*) ip=${word#vrdma.ip=} ;;
    vrdma.link=*) link=${word#vrdma.link=} ;;
    vrdma.shell=*) shell=${word#vrdma.shell=} ;;
    vrdma.packed=0) module_args="$module_args packed_ring=0" ;;
  esac
done
[ -n "$ip" ] && [ -n "$link" ] && [ -n "$shell" ] || { say "no vrdma.ip, vrdma.link or vrdma.shell"; finish fail; }

# The NIC (virtio-net, a tap in the test host) before virtio_rdma: its name is the only one so far.
nic=
for path in /sys/class/net/*; do
  [ -e "$path/device" ] && { nic=${path##*/}; break; }
done
[ -n "$nic" ] || { say "no-nic"; finish fail; }
ipr=/sbin/ip # iproute2: busybox's ip cannot create a veth pair
$ipr link set lo up
$ipr addr add "$link" dev "$nic" && $ipr link set "$nic" up || { say "nic-failed $nic"; finish fail; }

insmod /modules/virtio_rdma.ko $module_args || { say "insmod-failed virtio_rdma"; finish fail; }
dev=$(ls /sys/class/infiniband 2>/dev/null | head -n 1)
[ -n "$dev" ] || { dmesg | tail -n 20; say "no-ib-device"; finish fail; }
say "loaded $dev $(uptime_s)"
# The device's virtual MAC (the driver logs it): the netdev that carries it holds the VPC address, and the RDMA
# core fills port 1's GID table from it. A veth stands in for the VM's virtio-net interface of its VPC.
mac=$(dmesg | sed -n 's/.*virtual GID .*, MAC \([0-9a-f:]*\),.*/\1/p' | tail -n 1)
$ipr link add veth0 type veth peer name veth1 &&
  $ipr link set veth0 address "$mac" &&
  $ipr link set veth1 up && $ipr link set veth0 up &&
  $ipr addr add "$ip/24" dev veth0 || { say "veth-failed"; finish fail; }
say "ready $dev mac $mac nic $nic $(uptime_s)"

mkdir -p /tmp
tries=0
until nc "${shell%:*}" "${shell##*:}" -e /bin/sh; do
  tries=$((tries + 1))
  [ "$tries" -ge "$SHELL_TRIES" ] && { say "no-shell-listener $shell"; finish fail; }
  sleep 1
done
finish ok
