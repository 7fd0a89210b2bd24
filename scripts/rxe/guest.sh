# Stage 2 of the soft-RoCE test host, sourced by the job script run.sh writes (bash, PID 1, in the host's root
# seen through the overlay). Before sourcing, the job script sets:
#   RXE_TOKEN       unique per run: the start/exit marker lines carry it, so no other output can fake them
#   RXE_CWD         the caller's working directory
#   RXE_COMMAND     the command, as an array
#   RXE_OUT_DIRS    host folders shared read-write (9p tags out0, out1, ...), mounted at the same paths
#   RXE_ENV_FILE    a file of `export NAME=value` lines: the caller's environment that matters
# and then calls rxe_guest_main. Output goes to the serial console, which run.sh reads.

# How long rxe0's port may take to become ACTIVE with its IPv4 GID (index 1) in place.
RXE_PORT_WAIT_TENTHS=300
RXE_NETDEV=veth0
RXE_PEER=veth1
RXE_NETDEV_ADDRESS=10.233.0.1/24
RXE_PEER_ADDRESS=10.233.0.2/24
RXE_DEVICE=rxe0

rxe_guest_fail() {
  printf 'vrdma-rxe-guest: %s\n' "$*"
  rxe_guest_poweroff
}

rxe_guest_poweroff() {
  sync
  echo o >/proc/sysrq-trigger
  sleep 10
}

rxe_guest_mounts() {
  mount -t tmpfs -o mode=0755 run /run || rxe_guest_fail "tmpfs on /run failed"
  mkdir -p /dev/pts /dev/shm
  mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
  mount -t tmpfs -o mode=1777 shm /dev/shm
  local i=0 dir
  for dir in "${RXE_OUT_DIRS[@]}"; do
    mkdir -p "$dir" 2>/dev/null
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none "out$i" "$dir" \
      || rxe_guest_fail "mount of the writable share $dir failed"
    i=$((i + 1))
  done
}

# A veth pair that exists only inside the VM (no NIC leaves it: QEMU runs with -nic none), and ONE rxe device
# on veth0: QPs on one rxe device reach each other (rxe loops local traffic back), while two rxe devices on the
# two ends of the pair do not (the route to a local address goes through lo).
rxe_guest_network() {
  ip link set lo up || rxe_guest_fail "lo up failed"
  ip link add "$RXE_NETDEV" type veth peer name "$RXE_PEER" || rxe_guest_fail "veth pair creation failed"
  ip addr add "$RXE_NETDEV_ADDRESS" dev "$RXE_NETDEV"
  ip addr add "$RXE_PEER_ADDRESS" dev "$RXE_PEER"
  ip link set "$RXE_NETDEV" up
  ip link set "$RXE_PEER" up
  rdma link add "$RXE_DEVICE" type rxe netdev "$RXE_NETDEV" || rxe_guest_fail "rdma link add $RXE_DEVICE failed"
  local port=/sys/class/infiniband/$RXE_DEVICE/ports/1 tenths=0 state gid
  while :; do
    state=$(cat "$port/state" 2>/dev/null)
    gid=$(cat "$port/gids/1" 2>/dev/null)
    case $state in *ACTIVE*) case $gid in '' | 0000:0000:0000:0000:0000:0000:0000:0000) ;; *) break ;; esac ;; esac
    [ "$tenths" -ge "$RXE_PORT_WAIT_TENTHS" ] && rxe_guest_fail "$RXE_DEVICE port not ACTIVE (state '$state', gid[1] '$gid')"
    sleep 0.1
    tenths=$((tenths + 1))
  done
}

rxe_guest_main() {
  rxe_guest_mounts
  rxe_guest_network
  hostname vrdma-rxe 2>/dev/null
  # A clean environment: only what the caller passed, plus the marker that says "inside the test host".
  local rc
  printf 'VRDMA-RXE-START %s\n' "$RXE_TOKEN"
  # The command's stdout is a pipe, not the console: tools then print plain text (no colours, no cursor moves),
  # as they would under CI. stdin is empty: the console is not the command's input.
  env -i bash -c '. "$1"; shift; export VRDMA_IN_TEST_HOST=1; cd "$1" || exit 126; shift; exec "$@"' \
    rxe-job "$RXE_ENV_FILE" "$RXE_CWD" "${RXE_COMMAND[@]}" </dev/null 2>&1 | cat
  rc=${PIPESTATUS[0]}
  printf 'VRDMA-RXE-EXIT %s %d\n' "$RXE_TOKEN" "$rc"
  rxe_guest_poweroff
}
