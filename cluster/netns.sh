#!/usr/bin/env bash
# A small multi-host cluster on this machine, out of network namespaces (needs root).
#
#   cluster/netns.sh up [--rate 1gbit] [--topology bridge|pairwise]
#   cluster/netns.sh exec server python -m distnet.cli.main serve --bind tcp://10.77.0.1:5555 ...
#   cluster/netns.sh exec w1 python -m distnet.cli.main train --server tcp://10.77.0.1:5555 ...
#   cluster/netns.sh status
#   cluster/netns.sh down
#
# Hosts: "server" 10.77.0.1, "w1" 10.77.0.2, "w2" 10.77.0.3, each a namespace named
# $DN_PREFIX-<host> (DN_PREFIX defaults to "dn"). Topologies:
#   bridge   (default) each host has eth0 on a veth pair whose other end is a port of
#            bridge br0; the bridge itself lives in a fourth namespace, $DN_PREFIX-sw,
#            so nothing is added to the root namespace.
#   pairwise the server has one veth per worker (s-w1, s-w2); workers reach only it.
# Traffic stays inside the namespaces: there is no default route, no NAT and no
# address outside 10.77.0.0/24. --rate adds `tbf rate RATE burst 64kb latency 50ms`
# on every host interface (both directions: each direction leaves some host).
# `up` first removes what an earlier `up` left, so it can be run again at will;
# `down` removes everything and succeeds when nothing is there.
set -euo pipefail

PREFIX="${DN_PREFIX:-dn}"
HOSTS=(server w1 w2)
declare -A ADDR=([server]=10.77.0.1 [w1]=10.77.0.2 [w2]=10.77.0.3)
PYTHON="${PYTHON:-python3}"

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

ns() { echo "$PREFIX-$1"; }

need_root() {
    [[ $EUID -eq 0 ]] || { echo "netns.sh: needs root (ip netns)" >&2; exit 1; }
    command -v ip >/dev/null || { echo "netns.sh: the ip command (iproute2) is missing" >&2; exit 1; }
    if [[ ${#PREFIX} -gt 6 ]]; then
        echo "netns.sh: DN_PREFIX must be at most 6 characters (interface names)" >&2
        exit 2
    fi
}

shape() {  # shape NS DEV RATE: rate-limit the egress of DEV
    ip -n "$1" link set "$2" up
    if [[ -n "$3" ]]; then
        ip netns exec "$1" tc qdisc replace dev "$2" root tbf rate "$3" burst 64kb latency 50ms
    fi
}

down() {
    for host in "${HOSTS[@]}" sw; do
        if ip netns list | awk '{print $1}' | grep -qx "$(ns "$host")"; then
            # deleting a namespace deletes its veth ends, and with them their peers
            ip netns del "$(ns "$host")"
        fi
    done
}

up_bridge() {
    local rate="$1" sw
    sw="$(ns sw)"
    ip netns add "$sw"
    ip -n "$sw" link set lo up
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    for host in "${HOSTS[@]}"; do
        local n
        n="$(ns "$host")"
        ip -n "$sw" link add "p-$host" type veth peer name eth0 netns "$n"
        ip -n "$sw" link set "p-$host" master br0
        ip -n "$sw" link set "p-$host" up
        ip -n "$n" addr add "${ADDR[$host]}/24" dev eth0
        shape "$n" eth0 "$rate"
    done
}

up_pairwise() {
    local rate="$1" s
    s="$(ns server)"
    ip -n "$s" addr add "${ADDR[server]}/32" dev lo
    for host in w1 w2; do
        local n
        n="$(ns "$host")"
        ip -n "$s" link add "s-$host" type veth peer name eth0 netns "$n"
        # /32 addresses with a route per peer: each link carries exactly one pair
        ip -n "$n" addr add "${ADDR[$host]}/32" dev eth0
        shape "$s" "s-$host" "$rate"
        shape "$n" eth0 "$rate"
        ip -n "$s" route add "${ADDR[$host]}/32" dev "s-$host" src "${ADDR[server]}"
        ip -n "$n" route add "${ADDR[server]}/32" dev eth0 src "${ADDR[$host]}"
    done
}

check() {  # a TCP connection from each worker host to the server host, with Python
    local port=47700 listener
    ip netns exec "$(ns server)" "$PYTHON" -c "
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('${ADDR[server]}', $port)); s.listen(4); s.settimeout(10)
for _ in range(2):
    c, _ = s.accept(); c.sendall(b'ok'); c.close()
" &
    listener=$!
    local ok=1
    for host in w1 w2; do
        if ! ip netns exec "$(ns "$host")" "$PYTHON" -c "
import socket, time
for i in range(50):
    try:
        c = socket.create_connection(('${ADDR[server]}', $port), timeout=2)
        break
    except OSError:
        time.sleep(0.1)
else:
    raise SystemExit('no connection')
assert c.recv(2) == b'ok'
"; then
            echo "netns.sh: $host (${ADDR[$host]}) cannot reach the server ${ADDR[server]}" >&2
            ok=0
        fi
    done
    kill "$listener" 2>/dev/null || true
    wait "$listener" 2>/dev/null || true
    [[ $ok -eq 1 ]] || return 1
    echo "netns.sh: server ${ADDR[server]} reachable from w1 ${ADDR[w1]} and w2 ${ADDR[w2]}"
}

up() {
    local rate="" topology=bridge
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --rate) rate="${2:?--rate needs a value such as 1gbit}"; shift 2 ;;
            --topology) topology="${2:?--topology needs bridge or pairwise}"; shift 2 ;;
            *) echo "netns.sh up: unknown option $1" >&2; usage ;;
        esac
    done
    [[ $topology == bridge || $topology == pairwise ]] || usage
    down
    trap 'down; echo "netns.sh: up failed, removed the namespaces" >&2' ERR
    for host in "${HOSTS[@]}"; do
        ip netns add "$(ns "$host")"
        ip -n "$(ns "$host")" link set lo up
    done
    "up_$topology" "$rate"
    check
    trap - ERR
}

status() {
    for host in "${HOSTS[@]}"; do
        local n
        n="$(ns "$host")"
        if ip netns list | awk '{print $1}' | grep -qx "$n"; then
            # IPv4 only (pairwise puts the server's address on lo), loopback left out
            echo "$host ($n): $(ip -n "$n" -4 -brief addr | awk '{for (i = 3; i <= NF; i++)
                if ($i !~ /^127\./) printf "%s %s ", $1, $i}')"
        else
            echo "$host ($n): down"
        fi
    done
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    up) need_root; up "$@" ;;
    down) need_root; down ;;
    status) need_root; status ;;
    check) need_root; check ;;
    exec)
        need_root
        host="${1:?exec needs a host: server, w1 or w2}"; shift
        [[ -n "${ADDR[$host]:-}" ]] || { echo "netns.sh: unknown host $host" >&2; exit 2; }
        exec ip netns exec "$(ns "$host")" "$@" ;;
    *) usage ;;
esac
