# Stage 2 of the soft-RoCE test host, sourced by the job script run.sh writes (bash, PID 1, in the host's root
# seen through the overlay; the initramfs already mounted /run, /dev/pts, /dev/shm and the --out shares).
# Before sourcing, the job script sets:
#   RXE_TOKEN       unique per run: the start/exit marker lines carry it, so no other output can fake them
#   RXE_CWD         the caller's working directory
#   RXE_COMMAND     the command, as an array
#   RXE_ENV_FILE    a file of `export NAME=value` lines: the caller's environment that matters
#   RXE_LINK_ADDRESS  (multi-host runs only) ADDRESS/PREFIX: rxe0 goes on the NIC joined to the other test host
# and then calls rxe_guest_main. Output goes to the serial console, which run.sh reads.
# Every exec here reads its binary over 9p under TCG, which costs; hence builtins wherever one does the job.

RXE_GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# How long rxe0's port may take to become ACTIVE with its IPv4 GID (index 1) in place.
RXE_PORT_WAIT_TENTHS=300
RXE_NETDEV=veth0
RXE_PEER=veth1
RXE_NETDEV_ADDRESS=10.233.0.1/24
RXE_PEER_ADDRESS=10.233.0.2/24
RXE_DEVICE=rxe0
RXE_ZERO_GID=0000:0000:0000:0000:0000:0000:0000:0000

# A phase and its time since boot, for --verbose (it stays in the boot log otherwise).
rxe_guest_phase() {
  local up rest
  read -r up rest </proc/uptime
  printf 'vrdma-rxe: %s at %s s\n' "$1" "$up"
}

rxe_guest_fail() {
  printf 'vrdma-rxe-guest: %s\n' "$*"
  rxe_guest_poweroff
}

rxe_guest_poweroff() {
  sync
  echo o >/proc/sysrq-trigger
  # Power-off takes a moment; nothing must run meanwhile (PID 1 exiting would panic the kernel).
  while :; do read -r -t 10 -u "$RXE_WAIT_FD" _; done
}

# A veth pair that exists only inside the VM (no NIC leaves it: QEMU runs with -nic none), and ONE rxe device
# on veth0: QPs on one rxe device reach each other (rxe loops local traffic back), while two rxe devices on the
# two ends of the pair do not (the route to a local address goes through lo).
rxe_guest_network() {
  ip -batch - <<EOF || rxe_guest_fail "setting up lo and the veth pair failed"
link set lo up
link add $RXE_NETDEV type veth peer name $RXE_PEER
addr add $RXE_NETDEV_ADDRESS dev $RXE_NETDEV
addr add $RXE_PEER_ADDRESS dev $RXE_PEER
link set $RXE_NETDEV up
link set $RXE_PEER up
EOF
  rxe_guest_phase "veth pair up"
  rxe_guest_rxe_on "$RXE_NETDEV"
}

# A multi-host run: the VM's one NIC (run.sh --host-link) leads to the other test host and nowhere else; rxe0
# goes on it, so RDMA between the two hosts crosses that link with the two host addresses.
rxe_guest_host_link() {
  local path name netdev=
  for path in /sys/class/net/*; do
    name=${path##*/}
    [ "$name" != lo ] && [ -e "$path/device" ] && { netdev=$name; break; }
  done
  [ -n "$netdev" ] || rxe_guest_fail "no NIC for the host link (run.sh --host-link adds a virtio NIC)"
  ip -batch - <<EOF || rxe_guest_fail "setting up lo and $netdev ($RXE_LINK_ADDRESS) failed"
link set lo up
addr add $RXE_LINK_ADDRESS dev $netdev
link set $netdev up
EOF
  rxe_guest_phase "host link $netdev up ($RXE_LINK_ADDRESS)"
  rxe_guest_rxe_on "$netdev"
}

# rdma link add rxe0 on a netdev, then wait until its port is ACTIVE with its IPv4 GID (index 1) in place.
rxe_guest_rxe_on() {
  rdma link add "$RXE_DEVICE" type rxe netdev "$1" || rxe_guest_fail "rdma link add $RXE_DEVICE failed"
  local port=/sys/class/infiniband/$RXE_DEVICE/ports/1 tenths=0 state gid
  while :; do
    state=; gid=
    read -r state <"$port/state" 2>/dev/null
    read -r gid <"$port/gids/1" 2>/dev/null
    case $state in *ACTIVE*) [ -n "$gid" ] && [ "$gid" != "$RXE_ZERO_GID" ] && break ;; esac
    [ "$tenths" -ge "$RXE_PORT_WAIT_TENTHS" ] && rxe_guest_fail "$RXE_DEVICE port not ACTIVE (state '$state', gid[1] '$gid')"
    read -r -t 0.1 -u "$RXE_WAIT_FD" _
    tenths=$((tenths + 1))
  done
}

rxe_guest_main() {
  rxe_guest_phase "stage 2 started"
  exec {RXE_WAIT_FD}<>/run/vrdma-rxe-wait
  if [ -n "${RXE_LINK_ADDRESS:-}" ]; then rxe_guest_host_link; else rxe_guest_network; fi
  rxe_guest_phase "$RXE_DEVICE ACTIVE"
  local rc
  printf 'VRDMA-RXE-START %s\n' "$RXE_TOKEN"
  # A clean environment: only what the caller passed, plus the marker that says "inside the test host".
  # The command's stdout is a pipe, not the console: tools then print plain text (no colours, no cursor moves),
  # as they would under CI. stdin is empty: the console is not the command's input.
  (
    for name in $(compgen -e); do unset "$name"; done
    . "$RXE_ENV_FILE"
    export VRDMA_IN_TEST_HOST=1
    # tap's test processes get TypeScript from tsx, not ts-node (minutes under TCG): see tsx-for-tap.mjs.
    export NODE_OPTIONS="--import=$RXE_GUEST_DIR/tsx-for-tap.mjs${NODE_OPTIONS:+ $NODE_OPTIONS}"
    exec {RXE_WAIT_FD}>&-
    cd "$RXE_CWD" || exit 126
    exec "${RXE_COMMAND[@]}"
  ) </dev/null 2>&1 | cat
  rc=${PIPESTATUS[0]}
  printf 'VRDMA-RXE-EXIT %s %d\n' "$RXE_TOKEN" "$rc"
  rxe_guest_poweroff
}
