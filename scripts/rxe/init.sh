#!/bin/busybox sh
# /init of the soft-RoCE test host's initramfs (copied there by scripts/rxe/build.sh; runs under busybox).
# Stage 1: load the modules, mount the host's root (9p, read-only) under an overlay whose upper dir is a tmpfs,
# and switch_root into it, running the job script run.sh wrote (its path comes on the kernel command line as
# vrdma.job=...). The job script (bash, from the host) does stage 2: rxe0, the command, power-off.
/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
# Raw output on the console: the command's bytes reach run.sh unchanged (no \n -> \r\n).
stty -opost

# Phases with their time since boot, for --verbose (they stay in the boot log otherwise).
phase() { read -r up rest <"$proc/uptime"; echo "vrdma-rxe: $1 at $up s"; }
proc=/proc
phase "init started"

# Any failure ends the VM at once, with a line run.sh shows (it then reports that no exit code came back).
fail() {
  echo "vrdma-rxe-init: $*"
  echo o >/proc/sysrq-trigger
  sleep 10
}

while read -r module; do
  insmod "/modules/$module.ko" || fail "insmod $module failed"
done </modules/order
phase "modules loaded"

job=
upper_size=75%
for word in $(cat /proc/cmdline); do
  case $word in
    vrdma.job=*) job=${word#vrdma.job=} ;;
    vrdma.upper=*) upper_size=${word#vrdma.upper=} ;;
  esac
done
[ -n "$job" ] || fail "no vrdma.job= on the kernel command line"

mkdir -p /lower /upper /newroot
# cache=loose: the share is read-only and the host's files do not change under a run; it makes node start fast.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro host /lower || fail "mount of the host root (9p) failed"
mount -t tmpfs -o "size=$upper_size,mode=0755" upper /upper || fail "tmpfs for the overlay failed"
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work,index=off,xino=off,metacopy=off overlay /newroot \
  || fail "overlay mount failed"
phase "root mounted"
echo vrdma-rxe >/proc/sys/kernel/hostname
for fs in proc sys dev; do
  mount --move "/$fs" "/newroot/$fs" || fail "moving /$fs failed"
done
# What the job script needs that busybox does faster than the host's tools would (no exec over 9p).
mount -t tmpfs -o mode=0755 run /newroot/run || fail "tmpfs on /run failed"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
# A FIFO nobody writes: the job script sleeps with `read -t` on it (a builtin, where sleep would be an exec).
mkfifo /newroot/run/vrdma-rxe-wait
proc=/newroot/proc
[ -r "/newroot$job" ] || fail "the job script $job is not visible in the shared root"
# Host folders shared read-write (run.sh lists them next to the job script, one a line; tags out0, out1, ...).
out_index=0
if [ -r "/newroot${job%/*}/out-dirs" ]; then
  while IFS= read -r dir; do
    mkdir -p "/newroot$dir"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none "out$out_index" "/newroot$dir" \
      || fail "mount of the writable share $dir failed"
    out_index=$((out_index + 1))
  done <"/newroot${job%/*}/out-dirs"
fi
phase "switching root"
exec switch_root /newroot /bin/bash "$job"
