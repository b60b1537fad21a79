#!/usr/bin/env bash
# A real Slurm cluster on localhost with N emulated nodes, for the tests (and for trying the scripts).
#
#   tests/slurm/local_cluster.sh install           # Debian's slurmctld slurmd slurm-client munge (as root)
#   tests/slurm/local_cluster.sh start DIR [N]     # N nodes (default 2); config, state and logs in DIR;
#                                                  # prints `export SLURM_CONF=...` once every node is idle
#   tests/slurm/local_cluster.sh stop DIR          # stops what `start DIR` started, by its process ids
#
# Nodes node1..nodeN are one `slurmd -N nodeK` each on this machine (SlurmdPort 16818+K-1, own spool, pid
# and log file); `start` adds `127.0.0.1 node1 ...` to /etc/hosts for any name missing there, so that
# `scontrol show hostnames $SLURM_JOB_NODELIST | head -1` is a usable rendezvous address. Each node claims
# all CPUs (oversubscribed across nodes), a 1/N share of the memory and 2 fake GPUs (character devices in
# DIR/dev) so --gpus-per-node requests schedule; training inside still runs on the CPU
# (ACCELERATE_USE_CPU=true, NPROC_PER_NODE set by the tests). task/affinity binds each step to its CPUs.
# KillWait (SIGTERM to SIGKILL) is 5 s rather than the usual 30 s, so that a test's checkpoint made slow
# on purpose outlasts it: a step ended early then kills the checkpoint, as a real cluster would a big one.
set -euo pipefail

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

start() {
    local dir n=$2 host cpus mem_mb names k missing
    dir=$(mkdir -p "$1" && cd "$1" && pwd)
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(( ($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024) / n ))
    names=$(seq -f 'node%g' -s ' ' "$n")
    missing=$(for k in $names; do
        awk -v k="$k" '!/^[[:space:]]*#/ {for (i = 2; i <= NF; i++) if ($i == k) f = 1} END {exit !f}' /etc/hosts \
            || echo -n " $k"; done)
    [ -z "$missing" ] || echo "127.0.0.1$missing" >> /etc/hosts
    mkdir -p "$dir"/{munge,state,spool,log,dev}
    chmod 755 "$dir" "$dir/munge"  # munged refuses a socket directory others cannot traverse

    [ -f "$dir/munge.key" ] || { dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none; }
    chmod 400 "$dir/munge.key"
    munged --key-file="$dir/munge.key" --socket="$dir/munge/munge.socket.2" \
        --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge.seed" --force

    for i in 0 1; do [ -e "$dir/dev/nvidia$i" ] || mknod "$dir/dev/nvidia$i" c 195 "$i"; done
    cat > "$dir/gres.conf" <<CONF
NodeName=node[1-$n] Name=gpu File=$dir/dev/nvidia[0-1]
CONF
    cat > "$dir/slurm.conf" <<CONF
ClusterName=localtest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket.2
CredType=cred/munge
SlurmctldPort=16817
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
MinJobAge=3600
ReturnToService=2
MailProg=/bin/true
KillWait=5
GresTypes=gpu
$(for k in $(seq "$n"); do
    echo "NodeName=node$k NodeHostname=$host NodeAddr=127.0.0.1 Port=$((16817 + k)) CPUs=$cpus RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN"
done)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF" -i
    for k in $names; do
        mkdir -p "$dir/spool/slurmd-$k"
        slurmd -f "$SLURM_CONF" -N "$k"
    done
    for _ in $(seq 150); do
        if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$')" -eq "$n" ]; then
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.2
    done
    echo "local Slurm did not come up; logs in $dir/log" >&2
    return 1
}

stop() {
    local dir=$1 pidfile pid
    for pidfile in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?usage: start DIR [NODES]}" "${3:-2}" ;;
    stop) stop "${2:?usage: stop DIR}" ;;
    *) echo "usage: $0 install | start DIR [NODES] | stop DIR" >&2; exit 2 ;;
esac
