#!/usr/bin/env bash
# Attacks a live strata control plane and reports what it withstood.
#
# Starts a JobManager and two TaskManagers that share a cluster secret (from
# an owner-only temporary file), runs a long job, and meanwhile tries each
# hostile case against the JobManager's control port: a submission without
# the secret, one with a wrong secret, garbage bytes, a registration frame
# without a handshake, 40 connections that speak the handshake without the
# secret and then announce a 15 MiB frame, and 500 idle connections. For each
# it prints whether the JobManager refused it, the line it logged, and its
# RSS before and after; then whether the long job still FINISHED. A last case
# runs after the job: an insider that holds the secret stalls four frames one
# byte short of 16 MiB (see the ignored test
# peers_stalling_mid_frame_cannot_starve_the_taskmanagers_and_clients).
#
# Usage: scripts/hostile_cluster.sh   (STRATA=path/to/strata to pick the binary;
# by default the debug build under $CARGO_TARGET_DIR or target/, built if absent)
# Needs bash, python3 and Linux (/proc). Runs in well under two minutes.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
strata=${STRATA:-$target/debug/strata}
if [[ ! -x $strata ]]; then
    (cd "$root" && cargo build --bin strata)
fi
export STRATA_LOG=warn,strata=info
unset STRATA_AUTH_SECRET

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Fails the script with what it was waiting for, after $2 seconds.
wait_until() {
    local what=$1 limit=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            echo "timed out waiting for $what" >&2
            exit 1
        fi
        sleep 0.1
    done
}

umask 077
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/secret"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/wrong"
chmod 600 "$work/secret" "$work/wrong"

common=(
    -D heartbeat.interval=500ms -D heartbeat.timeout=5s
    -D taskmanager.numberOfTaskSlots=2
    -D taskmanager.memory.process.size=1g -D taskmanager.memory.managed.fraction=0.2
    -D security.handshake.timeout=2s -D rest.port=0
)
with_secret=("${common[@]}" -D "security.auth.secret-file=$work/secret")

"$strata" jobmanager --bind 127.0.0.1:0 "${with_secret[@]}" >"$work/jm.out" 2>"$work/jm.log" &
jm_pid=$!
pids+=("$jm_pid")
wait_until "the JobManager" 30 grep -q "JobManager listening on" "$work/jm.out"
addr=$(sed -n 's/^JobManager listening on //p' "$work/jm.out")
wait_until "the REST API" 30 grep -q "REST API at http://" "$work/jm.log"
rest=$(grep -o 'REST API at http://[^/]*' "$work/jm.log" | head -1 | sed 's|.*http://||')
for i in 1 2; do
    "$strata" taskmanager --jobmanager "$addr" "${with_secret[@]}" >"$work/tm$i.out" 2>"$work/tm$i.log" &
    pids+=("$!")
done
for i in 1 2; do
    wait_until "TaskManager $i to register" 60 grep -q "registered with the JobManager as" "$work/tm$i.log"
done

job() { # NAME ROWS RATE_LINE
    cat >"$work/$1.toml" <<EOF
[job]
name = "$1"
parallelism = 4

[[operator]]
name = "events"
type = "datagen"
rows = $2
keys = 1000
seed = 3
batch_size = 4096
$3

[[operator]]
type = "key_by"
keys = ["key"]

[[operator]]
name = "totals"
type = "aggregate"
aggs = ["count(*) as cnt", "sum(value) as total"]

[[operator]]
name = "out"
type = "csv_sink"
path = "$work/$1-out"
EOF
    echo "$work/$1.toml"
}

rss() { awk '/^VmRSS/ {print $2}' "/proc/$jm_pid/status"; }

# The hostile clients, in Python so that they speak the wire protocol
# (including the handshake and its HMAC) without strata's code.
cat >"$work/hostile.py" <<'EOF'
import hashlib, hmac, json, os, socket, struct, sys, time

def connect(addr):
    host, port = addr.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)

def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the JobManager")
        data += chunk
    return data

def closed_by_peer(s, timeout):
    """True when the peer closes within `timeout` seconds (EOF or reset)."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False

def handshake(s, secret):
    """The strata control-plane handshake as a client; raises if refused."""
    nonce = os.urandom(32)
    s.sendall(b"STRATA" + bytes([1, 1, 1 if secret else 0]) + nonce)
    hello = recv_exact(s, 41)
    if hello[:6] != b"STRATA":
        raise ConnectionError("not a strata hello")
    if secret and hello[8] & 1:
        label = b"strata/handshake"
        mine = hmac.new(secret, label + bytes([1, 1, 1]) + nonce + hello[9:], hashlib.sha256)
        s.sendall(mine.digest())
        theirs = recv_exact(s, 32)
        expected = hmac.new(secret, label + bytes([2, 1, 1]) + nonce + hello[9:], hashlib.sha256)
        if not hmac.compare_digest(theirs, expected.digest()):
            raise ConnectionError("bad server proof")
    # Without a secret against a JobManager with one, it closes now.
    s.settimeout(0.5)
    try:
        if s.recv(1, socket.MSG_PEEK) == b"":
            raise ConnectionError("closed after the hello")
    except socket.timeout:
        pass
    s.settimeout(30)

def frame(obj):
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body

def registration(port):
    return frame({"RegisterTaskManager": {"data_addr": f"127.0.0.1:{port}", "slots": [],
                  "io": "forged", "transport": "forged", "gpu": "forged"}})

mode, addr = sys.argv[1], sys.argv[2]
if mode == "garbage":
    s = connect(addr)
    s.sendall(bytes((i * 7919) % 251 for i in range(4096)))
    print("closed" if closed_by_peer(s, 10) else "open")
elif mode == "forged":
    s = connect(addr)
    s.sendall(registration(1))
    print("closed" if closed_by_peer(s, 10) else "open")
elif mode == "flood":
    # The handshake without the secret, then 15 MiB announced and 1 MiB sent.
    n, refused, held = int(sys.argv[3]), 0, []
    for _ in range(n):
        s = connect(addr)
        try:
            handshake(s, None)
            s.sendall(struct.pack(">I", 15 << 20) + b" " * (1 << 20))
            held.append(s)
        except (ConnectionError, OSError):
            refused += 1
    open_after = sum(1 for s in held if not closed_by_peer(s, 5))
    print(f"{refused}/{n} refused at the handshake, {open_after} still open")
elif mode == "idle":
    n, limit = int(sys.argv[3]), float(sys.argv[4])
    socks = [connect(addr) for _ in range(n)]
    start = time.monotonic()
    closed = 0
    for s in socks:
        if closed_by_peer(s, max(0.1, limit - (time.monotonic() - start))):
            closed += 1
    print(f"{closed}/{n} closed by the JobManager within {limit:.0f} s "
          f"(last after {time.monotonic() - start:.1f} s)")
elif mode == "stall":
    # An insider with the secret: registers, then stalls a 16 MiB frame
    # one byte short; holds the connections until killed.
    secret = open(sys.argv[3], "rb").read().rstrip(b"\r\n")
    n, ready = int(sys.argv[4]), sys.argv[5]
    held = []
    for i in range(n):
        s = connect(addr)
        handshake(s, secret)
        s.sendall(registration(40000 + i))
        s.sendall(struct.pack(">I", 16 << 20) + b" " * ((16 << 20) - 1))
        held.append(s)
    open(ready, "w").write("ready\n")
    time.sleep(600)
EOF
hostile() { python3 "$work/hostile.py" "$@"; }

# The long job: ~15 s at 100k rows/s on both TaskManagers.
long_job=$(job long 1500000 "rows_per_second = 100_000")
"$strata" submit --no-progress --jobmanager "$addr" "${with_secret[@]}" "$long_job" \
    >"$work/long.out" 2>"$work/long.err" &
long_pid=$!
pids+=("$long_pid")
running() { curl -fsS "http://$rest/jobs" 2>/dev/null | grep -q '"state":"Running"'; }
wait_until "the long job to run" 60 running

rows=()
row() { # CASE REFUSED LOGGED RSS_BEFORE RSS_AFTER
    rows+=("$(printf '%-27s | %-62.62s | %-62.62s | %6s MiB | %6s MiB' "$1" "$2" "$3" $(($4 / 1024)) $(($5 / 1024)))")
}
logged() { # what the JobManager's latest log line containing $1 says was wrong
    grep -F -- "$1" "$work/jm.log" | tail -1 | sed 's/^[^ ]* *[A-Z]* *//; s/.*handshake with [^ ]* failed: //' || true
}

intruder=$(job intruder 1000 "")

before=$(rss)
set +e
"$strata" submit --no-progress --jobmanager "$addr" "${common[@]}" "$intruder" >/dev/null 2>"$work/nosecret.err"
code=$?
set -e
row "submit without the secret" "exit $code: $(grep -o 'the peer requires a cluster secret[^:]*' "$work/nosecret.err")" \
    "$(logged 'but the peer has none')" "$before" "$(rss)"

before=$(rss)
set +e
"$strata" submit --no-progress --jobmanager "$addr" "${common[@]}" \
    -D "security.auth.secret-file=$work/wrong" "$intruder" >/dev/null 2>"$work/wrong.err"
code=$?
set -e
row "submit with a wrong secret" "exit $code: $(grep -o 'the two sides have different cluster secrets\|probably refused[^)]*' "$work/wrong.err" | head -1)" \
    "$(logged 'proof does not match')" "$before" "$(rss)"

before=$(rss)
result=$(hostile garbage "$addr")
row "4 KiB of garbage" "$result" "$(logged 'did not open with the strata handshake')" "$before" "$(rss)"

before=$(rss)
result=$(hostile forged "$addr")
row "registration, no handshake" "$result" "$(logged 'did not open with the strata handshake')" "$before" "$(rss)"

before=$(rss)
result=$(hostile flood "$addr" 40)
row "40 x 15 MiB, no secret" "$result" "$(logged 'but the peer has none')" "$before" "$(rss)"

before=$(rss)
result=$(hostile idle "$addr" 500 10)
idle_logged=$(grep -c 'not complete within 2s' "$work/jm.log" || true)
row "500 idle connections" "$result" "$idle_logged x: $(logged 'not complete within 2s')" "$before" "$(rss)"

set +e
wait "$long_pid"
long_code=$?
set -e
long_state=$(grep -o 'FINISHED\|FAILED\|CANCELED' "$work/long.out" | head -1 || true)
intruder_ran=$([[ -e $work/intruder-out ]] && echo "yes (BAD)" || echo "no")

# After the job: an insider with the secret stalls the frame budget.
before=$(rss)
python3 "$work/hostile.py" stall "$addr" "$work/secret" 4 "$work/stall.ready" &
stall_pid=$!
pids+=("$stall_pid")
wait_until "the stalled frames" 60 test -e "$work/stall.ready"
small=$(job small 50000 "")
set +e
"$strata" submit --no-progress --jobmanager "$addr" "${with_secret[@]}" "$small" >"$work/small.out" 2>"$work/small.err"
code=$?
set -e
starved=$(tr -d '\n' <"$work/small.err" | sed 's/^error: //; s/ at [0-9.:]* / /')
stall_after=$(rss)
# Heartbeats arrive every 500 ms: give them a few seconds to be starved.
for _ in $(seq 50); do
    grep -q 'lost: its control connection closed (control frames being received' "$work/jm.log" && break
    sleep 0.1
done
row "insider: 4 x 16 MiB-1 stall" "submit exit $code: ${starved:-FINISHED}" \
    "$(logged 'control frames being received hold')" "$before" "$stall_after"
kill "$stall_pid" 2>/dev/null || true
wait "$stall_pid" 2>/dev/null || true
for i in 1 2; do
    wait_until "TaskManager $i to register again" 30 grep -q "registered with the JobManager as" "$work/tm$i.log"
done
reconnects=$(cat "$work"/tm*.log | grep -c 'registering again' || true)

echo
echo "JobManager $addr (REST $rest), secret file $work/secret (mode $(stat -c %a "$work/secret"))"
printf '%-27s | %-62s | %-62s | %10s | %10s\n' "case" "refused?" "JobManager log (what was wrong)" "RSS before" "RSS after"
printf '%s\n' "$(printf '%.0s-' {1..185})"
printf '%s\n' "${rows[@]}"
echo
echo "long job during the attacks: ${long_state:-no summary} (exit $long_code); the intruder's job ran: $intruder_ran"
echo "TaskManager reconnections logged ('registering again'): $reconnects"
