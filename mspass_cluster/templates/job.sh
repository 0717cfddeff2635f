#!/usr/bin/env bash
@{directives}
#
# mspass_cluster @{version}: role "@{role}" of cluster @{cluster_id}.
# Runs as a Slurm job (sbatch) or by hand (bash this-file). Under sbatch,
# stdout and stderr go to the --output file above, whose directory must
# already exist (Slurm drops the job's output otherwise). The server runs in the background so that
# this script can forward Slurm's signals to it, wait for a clean exit and
# report the server's own exit status.
@{umask}
set -u

# --- prologue (job_script_prologue)
@{prologue}

# --- environment read by MsPASS and Dask
@{exports}

@{setup}

echo "mspass_cluster: @{role} starting on $(hostname) at $(date '+%Y-%m-%dT%H:%M:%S')"
@{command} &
server_pid=$!
forward_signal() { kill -TERM "$server_pid" 2>/dev/null; }
trap forward_signal TERM INT
# Slurm's notice ahead of the walltime (--signal=B:USR1@@N, node-local db_storage): stop in time.
trap 'echo "mspass_cluster: @{role} job near its walltime (SIGUSR1 from Slurm): stopping the server"; forward_signal' USR1
@{watchdog}
@{after_start}

# wait returns early when a trapped signal arrives; keep waiting until the
# server itself has exited, then take its exit status.
while :; do
    wait "$server_pid"
    status=$?
    kill -0 "$server_pid" 2>/dev/null || break
done
# If a signal interrupted the last wait just as the server exited, bash still
# holds the server's real status; a pid already waited for gives 127.
wait "$server_pid" 2>/dev/null
last=$?
[ "$last" -ne 127 ] && status=$last
[ -n "${watchdog_pid:-}" ] && kill "$watchdog_pid" 2>/dev/null
if [ -n "${users_pid:-}" ]; then
    # Still waiting for the server (which is gone): end it. Ended with a failure: it stopped the
    # server, so its status, not the server's SIGTERM, is the job's.
    if kill -0 "$users_pid" 2>/dev/null; then
        kill "$users_pid" 2>/dev/null
        wait "$users_pid" 2>/dev/null
    else
        wait "$users_pid" 2>/dev/null
        users_status=$?
        if [ "$users_status" -ne 0 ]; then status=$users_status; fi
    fi
fi
job_status=$status
@{after_exit}
echo "mspass_cluster: @{role} exited with status $status at $(date '+%Y-%m-%dT%H:%M:%S')"
exit "$job_status"
