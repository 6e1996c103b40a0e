# Sourced by the launch scripts: run the deepspeed launcher so that a stop signal reaches the training ranks.
#
# Why: a SIGTERM to the `deepspeed` process (a scheduler's preemption, `kill`) kills it alone and leaves DeepSpeed's
# launch.py and the ranks training on unsupervised; a SIGINT/SIGTERM that reaches launch.py makes it terminate the
# ranks and SIGKILL them 30 s later whatever they are doing, so a checkpoint that takes longer is lost. Instead the
# launcher runs in a process group of its own (out of reach of a terminal's Ctrl-C), and this shell traps INT/TERM
# and sends the signal to the training ranks of this node alone: each finishes its step, they save a checkpoint
# together and exit with status 130, and the launcher and this script exit with that status (docs/cluster.md).
#
# STOP_GRACE: seconds to wait for the ranks after the first signal before the launcher's whole process group is
# killed (default 0: no limit; the scheduler's own kill timeout still applies). A rank-less node (the ssh launcher's
# head node, whose ranks run elsewhere) passes the signal to the launcher: DeepSpeed then stops the remote ranks itself.

_stop_requested=""

_forward_stop() {  # SIGNAL LAUNCHER_PID
    local signal="$1" group="$2" ranks
    ranks=$(pgrep -g "$group" -f -- '--local_rank=' | tr '\n' ' ' || true)
    if [[ -n "$ranks" ]]; then
        echo "launch: SIG$signal -> training ranks $ranks(they finish the step, save a checkpoint and exit 130)" >&2
        kill -"$signal" $ranks 2>/dev/null || true
    else
        kill -"$signal" "$group" 2>/dev/null || true
    fi
    if [[ -z "$_stop_requested" && "${STOP_GRACE:-0}" -gt 0 ]]; then
        (sleep "$STOP_GRACE"; echo "launch: STOP_GRACE=$STOP_GRACE s passed: killing the launcher and its ranks" >&2
         kill -KILL -- -"$group" 2>/dev/null) &
    fi
    _stop_requested=1
}

run_supervised() {  # COMMAND...: run it in its own process group, forward INT/TERM, exit with its status
    [[ "${STOP_GRACE:-0}" =~ ^[0-9]+$ ]] || { echo "STOP_GRACE must be a whole number of seconds, got '$STOP_GRACE'" >&2; exit 2; }
    set -m  # job control: the background job gets its own process group
    "$@" &
    local launcher=$! status=0
    set +m
    trap "_forward_stop INT $launcher" INT
    trap "_forward_stop TERM $launcher" TERM
    while kill -0 "$launcher" 2>/dev/null; do
        wait "$launcher" || true  # returns early when a trapped signal arrives
    done
    wait "$launcher" || status=$?  # bash keeps a finished job's status
    exit "$status"
}
