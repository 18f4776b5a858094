#!/usr/bin/env bash
# A whole online backup, against real peers, the way a user would run it:
#
#   bash scripts/demo-backup.sh [proxy-directed|main-directed|both]     (default: both)
#
# For each topology it starts its own tgtd (the main target) with a 256 MiB LUN of random data,
# its own detour, and a long-lived initiator session held by qemu-nbd (libiscsi). It starts a
# backup and, as soon as the copy starts, a verified workload through that session: fio with
# crc32c verification (4 KiB and 64 KiB random reads and writes) and qemu-io pattern writes at
# known offsets, each followed by a checked read of another pattern slot. The workload keeps
# running through copy, drain, cutover and hand-back. Then it
# checks, and exits non-zero with a message naming the first check that failed:
#   - the restored backup image is the volume at the freeze (SHA-256 taken before the backup);
#   - every acknowledged write is on the main LUN: the pattern writes in tgtd's backing file and
#     through `qemu-io read -P` directly against tgtd, the last version of every block fio wrote
#     in tgtd's backing file, and a fio read-verify pass directly against tgtd;
#   - fio reported no verify error and no I/O error;
#   - the initiator's session is back on tgtd, and detour has no capture session left.
#
# Needs: node, tgtd/tgtadm (tgt), qemu-nbd/qemu-io (qemu-utils, qemu-block-extra), fio, curl;
# root (tgtd). Everything listens on loopback only. Set DETOUR_DEMO_KEEP=1 to keep the work
# directory (logs, images) for a look afterwards.
#
# Tunables (environment): DETOUR_DEMO_COPY_RATE (copy rate limit, default 16M per second, which
# makes the 256 MiB copy last about 16 s so the workload overlaps it), DETOUR_DEMO_AFTER_S
# (seconds the workload keeps running after the hand-back, default 3).

set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOPOLOGY="${1:-both}"

case "$TOPOLOGY" in
  both)
    # One full, independent cycle per topology: each run has its own processes and cleanup.
    bash "${BASH_SOURCE[0]}" proxy-directed || exit $?
    bash "${BASH_SOURCE[0]}" main-directed || exit $?
    exit 0
    ;;
  proxy-directed | main-directed) ;;
  -h | --help)
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "usage: bash scripts/demo-backup.sh [proxy-directed|main-directed|both]" >&2
    exit 2
    ;;
esac

MiB=$((1024 * 1024))
LUN_SIZE=$((256 * MiB))
IQN="iqn.2026-11.demo:backup"
# QEMU's libiscsi driver logs in under this name unless told otherwise.
QEMU_INITIATOR="iqn.2008-11.org.linux-kvm"
DETOUR_HOST="127.0.0.2"
MAIN_HOST="127.0.0.1"
COPY_RATE="${DETOUR_DEMO_COPY_RATE:-16M}"
AFTER_S="${DETOUR_DEMO_AFTER_S:-3}"
# qemu-io pattern writes: slots of 256 KiB from 128 MiB on (outside fio's regions), written over
# and over so the final value of a slot is the last write to it, not just any write.
PATTERN_BASE=$((128 * MiB))
PATTERN_SLOTS=24
PATTERN_LENS=(4096 65536 512 131072 8192 262144 1536 32768)

T_START=$(date +%s.%N)
say() { printf '[%6.2fs] %s\n' "$(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')" "$*"; }
die() {
  echo "demo-backup ($TOPOLOGY): FAILED: $*" >&2
  exit 1
}

for tool in node tgtd tgtadm qemu-nbd qemu-io fio curl sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || die "'$tool' is not installed (Debian packages: tgt qemu-utils qemu-block-extra fio curl)"
done
[ "$(id -u)" = 0 ] || die "tgtd needs root"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/detour-demo-$TOPOLOGY.XXXXXX")"
LUN_FILE="$WORK/main.img"
CONFIG="$WORK/detour.yaml"
DETOUR_LOG="$WORK/detour.log"
NBD_SOCK="$WORK/nbd.sock"
NBD_URI="nbd+unix:///?socket=$NBD_SOCK"
CHECK_SOCK="$WORK/check.sock"
CHECK_URI="nbd+unix:///?socket=$CHECK_SOCK"

TGTD_PID="" CONTROL_PORT="" DETOUR_PID="" NBD_PID="" CHECK_NBD_PID="" FIO_PID="" PATTERN_PID=""

# ---- cleanup: every process this script started, by PID ----------------------------------------

stop_pid() { # PID [grace seconds]
  local pid="$1" grace="${2:-5}" i
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

stop_tgtd() {
  local i
  [ -n "$TGTD_PID" ] || return 0
  # tgtd takes its signals through signalfd and ignores SIGTERM; it is stopped through its
  # control port (targets first: "delete system" refuses while targets exist), SIGKILL by PID as
  # the fallback.
  for ((i = 0; i < 10; i++)); do
    kill -0 "$TGTD_PID" 2>/dev/null || break
    tgtadm -C "$CONTROL_PORT" --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1
    tgtadm -C "$CONTROL_PORT" --op delete --mode system >/dev/null 2>&1 && break
    sleep 0.3
  done
  for ((i = 0; i < 30; i++)); do
    kill -0 "$TGTD_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$TGTD_PID" 2>/dev/null
  wait "$TGTD_PID" 2>/dev/null
  TGTD_PID=""
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$PATTERN_PID" ] && touch "$WORK/stop-patterns" 2>/dev/null
  stop_pid "$FIO_PID" 5
  stop_pid "$PATTERN_PID" 5
  stop_pid "$CHECK_NBD_PID" 5
  stop_pid "$NBD_PID" 5
  stop_pid "$DETOUR_PID" 10
  stop_tgtd
  if [ "$rc" != 0 ] && [ -f "$DETOUR_LOG" ]; then
    echo "--- last lines of detour's log ---" >&2
    tail -n 15 "$DETOUR_LOG" >&2
  fi
  if [ "${DETOUR_DEMO_KEEP:-}" = 1 ]; then
    echo "work directory kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- helpers ---------------------------------------------------------------------------------------

free_port() { # HOST
  node -e 'const s=require("net").createServer();s.listen(0,process.argv[1],()=>{console.log(s.address().port);s.close()})' "$1"
}

# Prints field PATH (a.b.c) of the JSON object on the last non-empty line of stdin.
json_get() {
  node -e '
    let s = "";
    process.stdin.on("data", (d) => (s += d)).on("end", () => {
      const line = s.trim().split("\n").filter(Boolean).pop() ?? "null";
      let v = JSON.parse(line);
      for (const k of process.argv[1].split(".")) v = v == null ? undefined : v[k];
      console.log(v === undefined || v === null ? "" : typeof v === "object" ? JSON.stringify(v) : String(v));
    });' "$1"
}

detour() { node "$REPO/bin/detour.js" "$@"; }

# The backup's phase as last seen, for the pattern writer's log (replaced whole, never half-written).
set_phase() {
  echo "$1" >"$WORK/phase.new" && mv -f "$WORK/phase.new" "$WORK/phase"
}

pattern_slot() { # SLOT -> "OFFSET LENGTH"
  echo "$((PATTERN_BASE + $1 * 256 * 1024)) ${PATTERN_LENS[$(($1 % ${#PATTERN_LENS[@]}))]}"
}
# What each pattern slot holds before the backup.
initial_pattern() { echo $((($1 * 53 + 101) % 255 + 1)); }

API=""
api_get() { curl -fsS --max-time 5 "http://$API$1"; }

wait_nbd_socket() { # SOCK PID LOG
  local i
  for ((i = 0; i < 200; i++)); do
    kill -0 "$2" 2>/dev/null || die "qemu-nbd exited: $(cat "$3")"
    [ -S "$1" ] && qemu-io -f raw -r -c 'read 0 512' "nbd+unix:///?socket=$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "qemu-nbd did not serve $1: $(cat "$3")"
}

# tgtd's connections for target 1 as "INITIATOR ADDRESS" lines.
tgt_connections() {
  tgtadm -C "$CONTROL_PORT" --lld iscsi --op show --mode conn --tid 1 2>/dev/null |
    awk '/Initiator:/ { ini = $2 } /IP Address:/ { print ini, $3 }'
}

# ---- 1. the main target: tgtd with a 256 MiB LUN of random data -------------------------------

say "topology $TOPOLOGY, work directory $WORK"
head -c "$LUN_SIZE" /dev/urandom >"$LUN_FILE" || die "cannot write $LUN_FILE"

# fio's regions are formatted as fio blocks first, so that a read-verify pass over them after the
# backup can check every block, including those the random workload happens not to write.
# Layout: 4 KiB jobs at 0-8 and 8-16 MiB, 64 KiB jobs at 32-48 and 48-64 MiB.
fio --ioengine=psync --filename="$LUN_FILE" --rw=write --verify=crc32c --do_verify=0 --verify_state_save=0 \
  --output="$WORK/fio-format.out" \
  --name=format4k --bs=4k --offset=0 --size=16M \
  --name=format64k --bs=64k --offset=32M --size=32M >/dev/null 2>&1 || die "fio could not format its regions: $(cat "$WORK/fio-format.out")"
for ((slot = 0; slot < PATTERN_SLOTS; slot++)); do
  read -r off len <<<"$(pattern_slot "$slot")"
  head -c "$len" /dev/zero | tr '\0' "\\$(printf %03o "$(initial_pattern "$slot")")" |
    dd of="$LUN_FILE" bs=64k iflag=fullblock oflag=seek_bytes seek="$off" conv=notrunc status=none || die "cannot lay out pattern slot $slot"
done
SHA_A="$(sha256sum "$LUN_FILE" | cut -d' ' -f1)"
say "LUN filled: 256 MiB, SHA-256 (A) $SHA_A"

MAIN_PORT=""
for attempt in 1 2 3 4 5; do
  MAIN_PORT="$(free_port "$MAIN_HOST")"
  # tgtd -C takes 0..32767; the value picks tgtd's control socket, so a collision with another
  # tgtd shows up as a start failure and the next attempt uses another number.
  CONTROL_PORT=$((1000 + RANDOM % 31000))
  tgtd -f -C "$CONTROL_PORT" --iscsi "portal=$MAIN_HOST:$MAIN_PORT" >"$WORK/tgtd.log" 2>&1 &
  TGTD_PID=$!
  up=""
  for ((i = 0; i < 100; i++)); do
    kill -0 "$TGTD_PID" 2>/dev/null || break
    if (exec 3<>"/dev/tcp/$MAIN_HOST/$MAIN_PORT") 2>/dev/null && tgtadm -C "$CONTROL_PORT" --op show --mode sys >/dev/null 2>&1; then
      up=1
      break
    fi
    sleep 0.1
  done
  [ -n "$up" ] && kill -0 "$TGTD_PID" 2>/dev/null && break
  kill -KILL "$TGTD_PID" 2>/dev/null
  wait "$TGTD_PID" 2>/dev/null
  TGTD_PID=""
done
[ -n "$TGTD_PID" ] || die "tgtd did not start: $(cat "$WORK/tgtd.log")"
MAIN_PORTAL="$MAIN_HOST:$MAIN_PORT"
tgtadm -C "$CONTROL_PORT" --lld iscsi --op new --mode target --tid 1 -T "$IQN" &&
  tgtadm -C "$CONTROL_PORT" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$LUN_FILE" &&
  tgtadm -C "$CONTROL_PORT" --lld iscsi --op bind --mode target --tid 1 -I ALL ||
  die "could not configure tgtd's target"
say "tgtd (pid $TGTD_PID) serves $IQN on $MAIN_PORTAL, control port $CONTROL_PORT"

# ---- 2. detour --------------------------------------------------------------------------------------

DETOUR_PORT="$(free_port "$DETOUR_HOST")"
API_PORT="$(free_port 127.0.0.1)"
API="127.0.0.1:$API_PORT"
DETOUR_PORTAL="$DETOUR_HOST:$DETOUR_PORT"
cat >"$CONFIG" <<EOF
portal: $DETOUR_PORTAL
api: $API
dataDir: $WORK/data
volumes:
  - name: vol1
    target: $IQN
    main: $MAIN_PORTAL
    topology: $TOPOLOGY
    control: { type: tgt, tid: 1, controlPort: $CONTROL_PORT }
    ioTimeoutBudget: 5s
    copyRateLimit: $COPY_RATE
EOF
node "$REPO/bin/detour.js" serve --config "$CONFIG" >"$DETOUR_LOG" 2>&1 &
DETOUR_PID=$!
for ((i = 0; i < 300; i++)); do
  kill -0 "$DETOUR_PID" 2>/dev/null || die "detour serve exited: $(tail -n 20 "$DETOUR_LOG")"
  api_get /healthz >/dev/null 2>&1 && break
  sleep 0.1
done
api_get /healthz >/dev/null 2>&1 || die "detour's API did not come up on $API"
say "detour (pid $DETOUR_PID) serves $DETOUR_PORTAL, API $API"

# ---- 3. the initiator: a long-lived libiscsi session held by qemu-nbd ------------------------------

# The initiator's persistent portal: detour's for proxy-directed (detour redirects it to the main
# target), the main target's for main-directed.
if [ "$TOPOLOGY" = proxy-directed ]; then PERSISTENT="$DETOUR_PORTAL"; else PERSISTENT="$MAIN_PORTAL"; fi
qemu-nbd -t -e 16 -k "$NBD_SOCK" -f raw "iscsi://$PERSISTENT/$IQN/1" >"$WORK/qemu-nbd.log" 2>&1 &
NBD_PID=$!
wait_nbd_socket "$NBD_SOCK" "$NBD_PID" "$WORK/qemu-nbd.log"
tgt_connections | grep -q "^$QEMU_INITIATOR $MAIN_HOST\$" || die "before the backup, the initiator is not on tgtd: $(tgt_connections)"
say "qemu-nbd (pid $NBD_PID) logged in at $PERSISTENT and is on tgtd; serving $NBD_URI"

# ---- 4. the backup, and the workload as soon as it copies ---------------------------------------------

START_JSON="$(detour backup start vol1 --label demo --json --api "$API")" || die "backup start failed: $START_JSON"
BACKUP_ID="$(echo "$START_JSON" | json_get id)"
[ -n "$BACKUP_ID" ] || die "backup start printed no id: $START_JSON"
say "backup $BACKUP_ID started"

T_BACKUP=$(date +%s.%N)
PHASE=""
for ((i = 0; i < 300; i++)); do
  SHOW="$(detour backup show "$BACKUP_ID" --json --api "$API")" || die "backup show failed: $SHOW"
  PHASE="$(echo "$SHOW" | json_get phase)"
  STATE="$(echo "$SHOW" | json_get state)"
  [ "$STATE" = running ] || die "backup ended before copying: $SHOW"
  [ "$PHASE" = switching ] || break
  sleep 0.2
done
[ "$PHASE" = copying ] || die "backup did not reach 'copying' (phase '$PHASE')"
T_COPYING=$(date +%s.%N)
set_phase copying
say "phase copying: starting fio and qemu-io pattern writes through the session"
# While the volume is in capture, the initiator's own connection is on detour, not on tgtd (detour's
# backend sessions come from $DETOUR_HOST).
if tgt_connections | grep -q "^$QEMU_INITIATOR $MAIN_HOST\$"; then die "during capture the initiator still has a connection on tgtd: $(tgt_connections)"; fi

# fio: two 4 KiB and two 64 KiB random read/write jobs, each in its own region, crc32c-verified
# while they run (verify_backlog: time_based jobs skip the final verify pass). Each job logs its
# I/O (write_iolog), so the last version of every block it wrote can be checked on tgtd's file
# afterwards. The trigger file ends the run once the backup is over; the runtime is only a safety
# cap, as long as the wait for the backup below (1500 polls of at least 0.2 s), so a slow host
# makes the demo slow rather than failed.
# fio runs as fast as it can: the drain has to converge while a workload writes at full speed (the
# drain merges touching extents, and holds the initiators' writes back if it still falls behind).
# DETOUR_DEMO_FIO_IOPS caps each job at that many I/Os per second (a gentler server); 0 = no cap.
FIO_COMMON=(--ioengine=nbd "--uri=$NBD_URI" --rw=randrw --rwmixread=30 --iodepth=8
  --verify=crc32c --verify_fatal=1 --verify_backlog=256 --verify_state_save=0 --serialize_overlap=1
  --time_based --runtime=600 "--trigger-file=$WORK/fio-stop" --output-format=json
  "--rate_iops=${DETOUR_DEMO_FIO_IOPS:-0}")
FIO_JOBS=(rw4k-0:4k:0:8M rw4k-1:4k:8M:8M rw64k-0:64k:32M:16M rw64k-1:64k:48M:16M)
FIO_ARGS=()
for j in "${FIO_JOBS[@]}"; do
  IFS=: read -r name bs off size <<<"$j"
  FIO_ARGS+=("--name=$name" "--bs=$bs" "--offset=$off" "--size=$size" "--write_iolog=$WORK/$name.iolog")
done
(cd "$WORK" && exec fio "${FIO_COMMON[@]}" "${FIO_ARGS[@]}") >"$WORK/fio.out" 2>&1 &
FIO_PID=$!

# One qemu-io process per step: it writes the next slot with a new value, then reads another slot
# back through the same session and checks that it holds the last value written there (or, if the
# writer has not reached it yet, its value from before the backup). So reads of the capture view are
# checked too: from the snapshot map, from the frozen main volume, and after the drain.
pattern_writer() {
  local k=0 slot len val off phase rslot roff rlen rval
  local -a expect=()
  for ((slot = 0; slot < PATTERN_SLOTS; slot++)); do expect[$slot]=$(initial_pattern "$slot"); done
  while [ ! -e "$WORK/stop-patterns" ] && [ "$k" -lt 1000 ]; do
    slot=$((k % PATTERN_SLOTS))
    read -r off len <<<"$(pattern_slot "$slot")"
    val=$(((k * 37 + 11) % 255 + 1))
    rslot=$(((k + 7) % PATTERN_SLOTS))
    read -r roff rlen <<<"$(pattern_slot "$rslot")"
    rval=${expect[$rslot]}
    phase="$(cat "$WORK/phase" 2>/dev/null)"
    if qemu-io -f raw -c "write -P $val $off $len" -c "read -P $rval $roff $rlen" "$NBD_URI" >"$WORK/qemu-io.out" 2>&1 &&
      grep -q "^wrote $len/$len bytes" "$WORK/qemu-io.out" && grep -q "^read $rlen/$rlen bytes" "$WORK/qemu-io.out" &&
      ! grep -q 'Pattern verification failed' "$WORK/qemu-io.out"; then
      expect[$slot]=$val
      echo "$k $slot $off $len $val $phase" >>"$WORK/patterns.log"
    else
      { echo "step #$k (phase $phase): write 0x$(printf %02x "$val") at $off ($len bytes), then read back 0x$(printf %02x "$rval") at $roff ($rlen bytes):"; cat "$WORK/qemu-io.out"; } >>"$WORK/patterns.failed"
      return 1
    fi
    k=$((k + 1))
    sleep 0.1
  done
}
pattern_writer &
PATTERN_PID=$!

# Follow the backup to its end; the cheap API poll keeps CPU for the workload.
T_DRAINING="" T_CUTOVER="" T_DONE=""
for ((i = 0; i < 1500; i++)); do
  OBJ="$(api_get "/v1/backups/$BACKUP_ID")" || die "cannot read backup $BACKUP_ID from the API"
  STATE="$(echo "$OBJ" | json_get state)"
  PHASE="$(echo "$OBJ" | json_get phase)"
  set_phase "$PHASE"
  now=$(date +%s.%N)
  case "$PHASE" in
    draining) [ -n "$T_DRAINING" ] || { T_DRAINING=$now; say "phase draining"; } ;;
    cutover) [ -n "$T_CUTOVER" ] || { T_CUTOVER=$now; say "phase cutover"; } ;;
  esac
  [ "$STATE" = running ] || break
  kill -0 "$FIO_PID" 2>/dev/null || die "fio ended while the backup was still running (phase $PHASE): $(tail -n 20 "$WORK/fio.out")"
  [ -e "$WORK/patterns.failed" ] && die "a qemu-io pattern write failed: $(cat "$WORK/patterns.failed")"
  sleep 0.2
done
T_DONE=$(date +%s.%N)
[ "$STATE" = completed ] || die "backup ended $STATE: $(echo "$OBJ" | json_get error)"
[ "$PHASE" = done ] || die "backup completed with phase '$PHASE', not 'done'"
set_phase after
say "backup completed, phase done"
# The backup is over and the workload is still going: it overlapped the whole backup.
kill -0 "$FIO_PID" 2>/dev/null || die "fio was no longer running when the backup finished"

# ---- 5. hand-back: the initiator is on tgtd again; detour has no capture session --------------------

back=""
for ((i = 0; i < 150; i++)); do
  if tgt_connections | grep -q "^$QEMU_INITIATOR $MAIN_HOST\$"; then back=1; break; fi
  sleep 0.1
done
[ -n "$back" ] || die "the initiator is not back on tgtd after the cutover: tgtadm shows '$(tgt_connections)'"
T_BACK=$(date +%s.%N)
STATUS="$(detour status --json --api "$API")" || die "detour status failed: $STATUS"
CAPTURE_SESSIONS="$(echo "$STATUS" | node -e '
  let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
    const o = JSON.parse(s.trim().split("\n").pop());
    console.log(o.volumes.flatMap((v) => v.sessions).filter((x) => x.mode === "capture").length + " " +
      o.volumes.flatMap((v) => v.sessions).length + " " + o.backups.length + " " + o.volumes.map((v) => v.phase).join(","));
  });')"
read -r N_CAPTURE N_SESSIONS N_RUNNING VOLUME_PHASE <<<"$CAPTURE_SESSIONS"
[ "$N_CAPTURE" = 0 ] || die "detour status still reports $N_CAPTURE capture session(s): $STATUS"
[ "$N_RUNNING" = 0 ] || die "detour status still reports a backup in progress: $STATUS"
say "initiator back on tgtd; detour: $N_SESSIONS session(s), none in capture, volume phase $VOLUME_PHASE"

# The workload runs on for a while directly against tgtd, then stops.
sleep "$AFTER_S"
kill -0 "$FIO_PID" 2>/dev/null || die "fio ended before it was told to: $(tail -n 20 "$WORK/fio.out")"
touch "$WORK/fio-stop" "$WORK/stop-patterns"
wait "$FIO_PID"
FIO_RC=$?
FIO_PID=""
wait "$PATTERN_PID"
PATTERN_RC=$?
PATTERN_PID=""
[ ! -e "$WORK/patterns.failed" ] && [ "$PATTERN_RC" = 0 ] || die "a qemu-io pattern write failed: $(cat "$WORK/patterns.failed" 2>/dev/null)"
say "workload stopped"

# ---- 6. checks -------------------------------------------------------------------------------------------

# fio: exit code 0, no verify message, every job's error 0, and each job verified what it wrote.
grep -Eq 'verify failed|bad magic|bad header|verify: ' "$WORK/fio.out" && die "fio reported a verify error: $(grep -E 'verify' "$WORK/fio.out" | head -n 5)"
[ "$FIO_RC" = 0 ] || die "fio exited with $FIO_RC: $(tail -n 20 "$WORK/fio.out")"
FIO_SUMMARY="$(node -e '
  const text = require("fs").readFileSync(process.argv[1], "utf8");
  const start = text.search(/^\{$/m), end = text.lastIndexOf("\n}");
  if (start < 0 || end < start) { console.error("no JSON report in fio output"); process.exit(1); }
  const { jobs } = JSON.parse(text.slice(start, end + 2));
  let r = 0, w = 0;
  for (const j of jobs) {
    if (j.error !== 0) { console.error(`job ${j.jobname}: error ${j.error}`); process.exit(1); }
    if (!(j.write.total_ios > 0)) { console.error(`job ${j.jobname} wrote nothing`); process.exit(1); }
    r += j.read.total_ios; w += j.write.total_ios;
  }
  if (jobs.length !== 4) { console.error(`${jobs.length} jobs in the report, expected 4`); process.exit(1); }
  console.log(`${r} ${w}`);' "$WORK/fio.out")" || die "fio's report shows an error: $FIO_SUMMARY"
read -r FIO_READS FIO_WRITES <<<"$FIO_SUMMARY"
say "fio: $FIO_WRITES writes and $FIO_READS reads, crc32c-verified, no I/O or verify error"

stop_pid "$NBD_PID" 5
NBD_PID=""

# Pattern writes, final value per slot, in tgtd's backing file...
N_PATTERNS=$(wc -l <"$WORK/patterns.log")
[ "$N_PATTERNS" -gt 0 ] || die "no pattern write was made"
PATTERN_PHASES="$(awk '{ n[$6]++ } END { for (p in n) printf "%s %d, ", p, n[p] }' "$WORK/patterns.log" | sed 's/, $//')"
declare -A LAST_VAL=() LAST_OFF=() LAST_LEN=()
while read -r k slot off len val phase; do
  LAST_VAL[$slot]=$val LAST_OFF[$slot]=$off LAST_LEN[$slot]=$len
done <"$WORK/patterns.log"
QEMU_IO_READS=()
for slot in "${!LAST_VAL[@]}"; do
  off=${LAST_OFF[$slot]} len=${LAST_LEN[$slot]} val=${LAST_VAL[$slot]}
  cmp -s -n "$len" <(head -c "$len" /dev/zero | tr '\0' "\\$(printf %03o "$val")") <(dd if="$LUN_FILE" iflag=skip_bytes,count_bytes skip="$off" count="$len" status=none) ||
    die "pattern 0x$(printf %02x "$val") ($len bytes at $off) is not in tgtd's backing file"
  QEMU_IO_READS+=(-c "read -P $val $off $len")
done
# ...and read back directly from tgtd by qemu-io.
qemu-io -f raw -r "${QEMU_IO_READS[@]}" "iscsi://$MAIN_PORTAL/$IQN/1" >"$WORK/qemu-io-read.out" 2>&1 ||
  die "qemu-io read -P directly against tgtd failed: $(grep -v '^read\|ops;' "$WORK/qemu-io-read.out" | head -n 5)"
grep -q 'Pattern verification failed' "$WORK/qemu-io-read.out" && die "qemu-io read -P against tgtd: $(grep 'Pattern' "$WORK/qemu-io-read.out" | head -n 3)"
say "qemu-io: $N_PATTERNS pattern writes ($PATTERN_PHASES); the last one of each of ${#LAST_VAL[@]} slots is in tgtd's file and reads back from tgtd"

# fio's data: the last version of every block each job wrote, in tgtd's backing file. fio's verify
# header carries the block's offset and the job's write sequence number (16 bits); the job's I/O log
# says which write was the last one to each block.
FIO_FILE_CHECK="$(node - "$LUN_FILE" "$WORK" "${FIO_JOBS[@]}" <<'EOF'
const fs = require('fs');
const [file, work, ...jobs] = process.argv.slice(2);
const table = new Uint32Array(256);
for (let i = 0; i < 256; i++) {
  let c = i;
  for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
  table[i] = c >>> 0;
}
// fio stores CRC32C without the final inversion.
const crc32c = (b) => {
  let c = 0xffffffff;
  for (let i = 0; i < b.length; i++) c = table[(c ^ b[i]) & 0xff] ^ (c >>> 8);
  return c >>> 0;
};
const fd = fs.openSync(file, 'r');
let blocks = 0;
process.on('uncaughtException', (err) => {
  console.log(err.message);
  process.exit(1);
});
jobs.forEach((spec, index) => {
  const name = spec.split(':')[0];
  const last = new Map();
  let n = 0;
  for (const line of fs.readFileSync(`${work}/${name}.iolog`, 'utf8').split('\n')) {
    const f = line.split(' ');
    if (f[2] !== 'write') continue;
    last.set(Number(f[3]), { seq: n++, len: Number(f[4]) });
  }
  if (n === 0) throw new Error(`${name}: its I/O log has no write`);
  for (const [offset, { seq, len }] of last) {
    const b = Buffer.alloc(len);
    fs.readSync(fd, b, 0, len, offset);
    const where = `${name}, block at ${offset} (write #${seq})`;
    if (b.readUInt16LE(0) !== 0xacca) throw new Error(`${where}: no fio block header`);
    if (b.readUInt32LE(4) !== len || Number(b.readBigUInt64LE(16)) !== offset) throw new Error(`${where}: the header describes another block`);
    if (b.readUInt16LE(32) !== index + 1) throw new Error(`${where}: written by job ${b.readUInt16LE(32)}`);
    if (crc32c(b.subarray(0, 36)) !== b.readUInt32LE(36)) throw new Error(`${where}: header checksum mismatch`);
    if (crc32c(b.subarray(44)) !== b.readUInt32LE(40)) throw new Error(`${where}: data checksum mismatch`);
    if (b.readUInt16LE(34) !== (seq & 0xffff)) throw new Error(`${where}: holds the job's write #${b.readUInt16LE(34)} (mod 65536), an older version`);
    blocks++;
  }
});
console.log(blocks);
EOF
)" || die "fio's data on tgtd: $FIO_FILE_CHECK"
say "fio: the last version of all $FIO_FILE_CHECK blocks it wrote is in tgtd's file"

# A read-verify pass over fio's whole regions, directly against tgtd through a second qemu-nbd.
qemu-nbd -t -e 4 -k "$CHECK_SOCK" -f raw "iscsi://$MAIN_PORTAL/$IQN/1" >"$WORK/qemu-nbd-check.log" 2>&1 &
CHECK_NBD_PID=$!
wait_nbd_socket "$CHECK_SOCK" "$CHECK_NBD_PID" "$WORK/qemu-nbd-check.log"
(cd "$WORK" && exec fio --ioengine=nbd "--uri=$CHECK_URI" --rw=read --verify=crc32c --verify_fatal=1 --verify_state_save=0 \
  --output-format=json \
  --name=check4k --bs=4k --offset=0 --size=16M \
  --name=check64k --bs=64k --offset=32M --size=32M) >"$WORK/fio-check.out" 2>&1 ||
  die "fio read-verify directly against tgtd failed: $(grep -E 'verify|error' "$WORK/fio-check.out" | head -n 5)"
stop_pid "$CHECK_NBD_PID" 5
CHECK_NBD_PID=""
say "fio: read-verify of its 48 MiB directly against tgtd passed"

# The backup: the volume at its freeze.
FINAL="$(detour backup show "$BACKUP_ID" --json --api "$API")" || die "backup show failed: $FINAL"
BACKUP_SHA="$(echo "$FINAL" | json_get sha256)"
FREEZE_SEQ="$(echo "$FINAL" | json_get freezeSeq)"
[ "$BACKUP_SHA" = "$SHA_A" ] || die "the backup's sha256 is $BACKUP_SHA, not A = $SHA_A"
detour restore "$BACKUP_ID" --to-file "$WORK/restored.img" --config "$CONFIG" >"$WORK/restore.out" 2>&1 || die "restore failed: $(cat "$WORK/restore.out")"
SHA_R="$(sha256sum "$WORK/restored.img" | cut -d' ' -f1)"
[ "$SHA_R" = "$SHA_A" ] || die "the restored image's SHA-256 is $SHA_R, not A = $SHA_A"
rm -f "$WORK/restored.img"
say "restored image SHA-256 = A"

# ---- 7. summary -------------------------------------------------------------------------------------------

TIMINGS="$(node -e '
  const fs = require("fs");
  const lines = fs.readFileSync(process.argv[1], "utf8").split("\n").filter((l) => l.startsWith("{")).map((l) => { try { return JSON.parse(l); } catch { return {}; } });
  const cut = lines.find((l) => l.msg === "cutover");
  const rounds = lines.filter((l) => l.msg === "drain round");
  const bytes = rounds.reduce((n, l) => n + (l.bytes || 0), 0);
  const b = JSON.parse(process.argv[2].trim().split("\n").pop());
  const secs = (Date.parse(b.finishedAt) - Date.parse(b.startedAt)) / 1000;
  console.log([secs.toFixed(1), cut ? cut.pauseMs : "?", rounds.length, (bytes / 1048576).toFixed(1)].join(" "));' "$DETOUR_LOG" "$FINAL")"
read -r BACKUP_S PAUSE_MS DRAIN_ROUNDS DRAIN_MIB <<<"$TIMINGS"
span() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
COPY_S="$(span "$T_COPYING" "${T_DRAINING:-$T_DONE}")"
DRAIN_S="$(span "${T_DRAINING:-$T_DONE}" "${T_CUTOVER:-$T_DONE}")"

cat <<EOF

detour backup demo: $TOPOLOGY: PASSED
  backup          $BACKUP_ID completed, phase done, freezeSeq $FREEZE_SEQ, ${BACKUP_S} s (copy ~${COPY_S} s at ${COPY_RATE}/s, drain ~${DRAIN_S} s)
  drain           $DRAIN_ROUNDS round(s), $DRAIN_MIB MiB written back to the main LUN
  cutover pause   ${PAUSE_MS} ms
  workload        fio $FIO_WRITES writes, $FIO_READS reads; $N_PATTERNS qemu-io pattern writes ($PATTERN_PHASES)
  backup image    SHA-256 = A ($SHA_A)
  main LUN        every acknowledged write present (tgtd's file, qemu-io read -P and fio read-verify against tgtd)
  fio             no I/O error, no verify error
  hand-back       initiator back on tgtd; detour has no capture session
EOF
exit 0
