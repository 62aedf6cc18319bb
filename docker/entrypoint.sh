#!/bin/sh
# Entrypoint of the diffsteer images. Hands over to the `diffsteer` found on PATH with `exec`, so
# diffsteer gets the container's signals (SIGTERM on `docker stop`) directly.
#
#   entrypoint.sh [train [METHOD [CONFIG]]] [ARGS...]
#       diffsteer train METHOD --config CONFIG_PATH ARGS...
#       METHOD defaults to $DIFFSTEER_METHOD, CONFIG to $DIFFSTEER_CONFIG (the first ARG starting
#       with "-" ends the positional ones). A relative CONFIG is taken inside $DIFFSTEER_CONFIG_DIR
#       (default /config). Checks that the config is a readable file and that $DIFFSTEER_OUTPUT_DIR
#       (default /output) is a writable directory, creating it if missing. No arguments means `train`.
#   entrypoint.sh serve [ARGS...]
#       diffsteer serve ARGS..., or `serve --host 0.0.0.0 --port 8000` when ARGS is empty.
#   entrypoint.sh generate|policies|ab|-OPTION [ARGS...]
#       diffsteer's other subcommands (and options such as --help) unchanged.
#   entrypoint.sh METHOD [CONFIG] [ARGS...]
#       anything else is a training method: the same as `train METHOD [CONFIG] [ARGS...]` (the README's
#       `docker run ... diffsteer:train alignprop alignprop.yaml --resume`).
#
# Exit codes of its own (sysexits.h): 64 usage, 66 config missing, 73 output not writable,
# 127 no diffsteer on PATH. Otherwise the exit code is diffsteer's.
set -eu

prog=diffsteer-entrypoint

die() {
    code=$1
    shift
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit "$code"
}

require_diffsteer() {
    command -v diffsteer >/dev/null 2>&1 ||
        die 127 "no 'diffsteer' executable on PATH ($PATH); is the package installed in this image?"
}

check_output_dir() {
    out=$1
    if [ ! -e "$out" ]; then
        mkdir -p -- "$out" 2>/dev/null || die 73 "output directory $out does not exist and cannot be created"
    fi
    [ -d "$out" ] || die 73 "output path $out is not a directory"
    probe="$out/.diffsteer-write-probe.$$"
    # A real write, not `test -w`: that ignores some read-only mounts and ACL setups.
    if ! (: >"$probe") 2>/dev/null; then
        die 73 "output directory $out is not writable by uid $(id -u); mount a writable volume there" \
            "(e.g. -v \"\$PWD/out:$out\" on a directory owned by that uid) or set DIFFSTEER_OUTPUT_DIR"
    fi
    rm -f -- "$probe"
}

run_train() {
    method=${DIFFSTEER_METHOD:-}
    config=${DIFFSTEER_CONFIG:-}
    if [ $# -gt 0 ]; then
        case $1 in -*) ;; *) method=$1; shift ;; esac
    fi
    if [ $# -gt 0 ]; then
        case $1 in -*) ;; *) config=$1; shift ;; esac
    fi
    [ -n "$method" ] ||
        die 64 "no training method: run 'train METHOD CONFIG [ARGS...]' or set DIFFSTEER_METHOD"
    [ -n "$config" ] ||
        die 64 "no config file for method '$method': run 'train $method CONFIG [ARGS...]' or set DIFFSTEER_CONFIG"
    case $config in
        /*) config_path=$config ;;
        *) config_path=${DIFFSTEER_CONFIG_DIR:-/config}/$config ;;
    esac
    [ -f "$config_path" ] ||
        die 66 "config file not found: $config_path (mount it, e.g. -v \"\$PWD/configs:/config:ro\")"
    [ -r "$config_path" ] || die 66 "config file not readable by uid $(id -u): $config_path"
    check_output_dir "${DIFFSTEER_OUTPUT_DIR:-/output}"
    require_diffsteer
    exec diffsteer train "$method" --config "$config_path" "$@"
}

if [ $# -eq 0 ]; then
    set -- train
fi

case $1 in
    train)
        shift
        run_train "$@"
        ;;
    serve)
        shift
        if [ $# -eq 0 ]; then
            set -- --host 0.0.0.0 --port 8000
        fi
        require_diffsteer
        exec diffsteer serve "$@"
        ;;
    generate | policies | ab | -*)
        require_diffsteer
        exec diffsteer "$@"
        ;;
    *)
        run_train "$@"
        ;;
esac
