#!/usr/bin/env bash
# Start, stop or inspect a one-node SLURM cluster on this machine (munged + slurmctld + slurmd).
#
#   tools/slurm/local_cluster.sh start    # idempotent; waits until the node is idle
#   tools/slurm/local_cluster.sh status   # exit 0 when the node accepts jobs
#   tools/slurm/local_cluster.sh env      # prints `export SLURM_CONF=...` for client commands
#   tools/slurm/local_cluster.sh stop     # cancels its jobs, stops daemons by their pid files
#
# Needs root and Debian's `slurm-wlm` and `munge` packages (tools/slurm/ci_setup.sh installs
# them). Config, munge key and socket, pid, log, state and spool files all live in
# $ADLIB_SLURM_DIR. Client commands (sinfo, sbatch, squeue, snakemake's SLURM plugin) find the
# cluster through SLURM_CONF (`eval "$(tools/slurm/local_cluster.sh env)"`). The one file
# written outside it is the symlink /etc/slurm/slurm.conf -> $ADLIB_SLURM_DIR/etc/slurm.conf,
# made only when /etc/slurm/slurm.conf is absent (or already such a symlink) and removed by
# `stop`: snakemake-executor-plugin-slurm-jobstep strips every SLURM_* variable, SLURM_CONF
# included, before its `srun` inside the job, so that srun only finds the default path.
#
# Settings (environment variables):
#   ADLIB_SLURM_DIR            state directory                          [/tmp/adlib-slurm]
#   ADLIB_SLURM_PARTITION      name of the one (default) partition      [local]
#   ADLIB_SLURM_GPUS           GPUs the node advertises (GRES gpu): /dev/nvidia0.. when they
#                              exist, else /dev/null-like stand-ins      [2]
#   ADLIB_SLURM_CTLD_PORT      slurmctld port (slurmd uses port + 1)    [6817]
#   ADLIB_SLURM_START_TIMEOUT  seconds to wait for the node to be idle  [60]
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

DIR="${ADLIB_SLURM_DIR:-/tmp/adlib-slurm}"
PARTITION="${ADLIB_SLURM_PARTITION:-local}"
GPUS="${ADLIB_SLURM_GPUS:-2}"
CTLD_PORT="${ADLIB_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT=$((CTLD_PORT + 1))
START_TIMEOUT="${ADLIB_SLURM_START_TIMEOUT:-60}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONF="$DIR/etc/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
export SLURM_CONF="$CONF"

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# pid_alive PIDFILE NAME: true when PIDFILE names a live process whose command is NAME.
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm ]] || return 1
    [[ $(</proc/"$pid"/comm) == "$name" ]] || return 1
    # a zombie (exited, not yet reaped by its parent) is not alive
    [[ $(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null) != Z ]]
}

node_state() { sinfo -h -n localhost -o '%T' 2>/dev/null | head -n1 || true; }

require_tools() {
    local t
    for t in munged mungekey slurmctld slurmd sinfo scontrol; do
        command -v "$t" >/dev/null 2>&1 \
            || die "'$t' not found: install the packages first (tools/slurm/ci_setup.sh or apt-get install -y slurm-wlm munge)"
    done
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd runs jobs as any user only as root)"
}

# Hardware line for the node from `slurmd -C` (CPUs, sockets, cores, threads), memory kept
# 5% below what slurmd sees so the node is never drained for "Low RealMemory".
write_config() {
    mkdir -p "$DIR"/{etc,munge,run,log,state,spool}
    chmod 700 "$DIR/munge"
    local hw mem gres_line=""
    hw=$(slurmd -C | head -n1 | tr ' ' '\n' \
        | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
    mem=$(slurmd -C | head -n1 | tr ' ' '\n' | sed -n 's/^RealMemory=//p')
    mem=$((mem * 95 / 100))
    : > "$DIR/etc/plugstack.conf"
    : > "$DIR/etc/gres.conf"
    if [[ $GPUS -gt 0 ]]; then
        gres_line="Gres=gpu:$GPUS"
        local files="/dev/nvidia[0-$((GPUS - 1))]" i
        if [[ ! -c /dev/nvidia$((GPUS - 1)) ]]; then
            # No real GPUs: slurmd drops file-less GPUs, so give it character devices that are
            # copies of /dev/null. Jobs get --gpus scheduling and CUDA_VISIBLE_DEVICES, no GPU.
            mkdir -p "$DIR/dev"
            for ((i = 0; i < GPUS; i++)); do
                [[ -c $DIR/dev/gpu$i ]] || mknod "$DIR/dev/gpu$i" c 1 3 2>/dev/null || {
                    log "warning: cannot create $DIR/dev/gpu$i (mknod not permitted): node has no GPUs"
                    gres_line="" && break
                }
            done
            files="$DIR/dev/gpu[0-$((GPUS - 1))]"
        fi
        [[ -z $gres_line ]] || echo "Name=gpu File=$files" > "$DIR/etc/gres.conf"
    fi
    sed -e "s|@DIR@|$DIR|g" -e "s|@PARTITION@|$PARTITION|g" -e "s|@NODE_HW@|$hw|" \
        -e "s|@MEM_MB@|$mem|" -e "s|@NODE_GRES@|$gres_line|" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|" -e "s|@SLURMD_PORT@|$SLURMD_PORT|" \
        "$HERE/slurm.conf.template" > "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
}

# link_etc_conf: point the default config path at this cluster unless a real config is there.
link_etc_conf() {
    if [[ -L $ETC_CONF || ! -e $ETC_CONF ]]; then
        mkdir -p "$(dirname "$ETC_CONF")"
        ln -sfn "$CONF" "$ETC_CONF"
    elif [[ $(readlink -f "$ETC_CONF") != "$(readlink -f "$CONF")" ]]; then
        log "warning: $ETC_CONF is a real config, not linked to $CONF; srun inside" \
            "snakemake's SLURM jobs will use it and fail to reach this cluster"
    fi
}

unlink_etc_conf() {
    if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then rm -f "$ETC_CONF"; fi
}

start_munged() {
    if pid_alive "$DIR/munge/munged.pid" munged; then return; fi
    [[ -s $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key" --force
    chmod 400 "$DIR/munge/munge.key"
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start; see $DIR/log/munged.log"
}

start_slurm() {
    if ! pid_alive "$DIR/run/slurmctld.pid" slurmctld; then
        slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    fi
    if ! pid_alive "$DIR/run/slurmd.pid" slurmd; then
        slurmd -f "$CONF" -N localhost || die "slurmd did not start; see $DIR/log/slurmd.log"
    fi
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
            idle*|mixed*|allocated*|completing*) return 0 ;;
            inval*) break ;;
            down*|drain*)
                scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "node not idle (state: '${state:-no answer}', timeout ${START_TIMEOUT}s); last log lines:"
    tail -n 5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
    return 1
}

cmd_start() {
    require_tools
    if pid_alive "$DIR/munge/munged.pid" munged && pid_alive "$DIR/run/slurmctld.pid" slurmctld \
        && pid_alive "$DIR/run/slurmd.pid" slurmd && [[ -n $(node_state) ]]; then
        log "already running ($DIR)"
    else
        local t0=$SECONDS
        write_config
        link_etc_conf
        start_munged
        start_slurm
        wait_idle || die "cluster did not come up"
        log "started in $((SECONDS - t0))s ($DIR)"
    fi
    sinfo
}

# stop_daemon PIDFILE NAME: TERM, wait up to 15 s, then KILL; only the process the file names.
stop_daemon() {
    local pidfile=$1 name=$2 pid i
    if pid_alive "$pidfile" "$name"; then
        pid=$(<"$pidfile")
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 30; i++)); do
            pid_alive "$pidfile" "$name" || break
            sleep 0.5
        done
        if pid_alive "$pidfile" "$name"; then kill -KILL "$pid" 2>/dev/null || true; fi
        log "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
}

cmd_stop() {
    if pid_alive "$DIR/run/slurmctld.pid" slurmctld && [[ -s $CONF ]]; then
        scancel --full --quiet --partition="$PARTITION" >/dev/null 2>&1 || true
        sleep 1
    fi
    stop_daemon "$DIR/run/slurmd.pid" slurmd
    stop_daemon "$DIR/run/slurmctld.pid" slurmctld
    stop_daemon "$DIR/munge/munged.pid" munged
    unlink_etc_conf
}

cmd_status() {
    local ok=0 d
    for d in "munge/munged.pid munged" "run/slurmctld.pid slurmctld" "run/slurmd.pid slurmd"; do
        set -- $d
        if pid_alive "$DIR/$1" "$2"; then echo "$2: running (pid $(<"$DIR/$1"))"
        else echo "$2: not running"; ok=1; fi
    done
    if ((ok == 0)); then
        sinfo || ok=1
        case $(node_state) in idle*|mixed*|allocated*|completing*) ;; *) ok=1 ;; esac
    fi
    return $ok
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env   (state directory: $DIR)" >&2; exit 2 ;;
esac
