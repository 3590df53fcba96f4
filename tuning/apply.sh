#!/usr/bin/env bash
# apply.sh -- install Kometa's kernel / OS tuning on this host.
#
# Idempotent: files are only rewritten when their content differs, live
# sysctls only written when they do not already satisfy the recommendation,
# the user only created when missing. See docs/tuning.md.

set -euo pipefail
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# parse_sysctl_file, normalize, is_uint, num_cmp (shared with check.sh).
# shellcheck source=SCRIPTDIR/lib.sh
. "$SCRIPT_DIR/lib.sh"

SYSCTL_SRC=$SCRIPT_DIR/sysctl-kometa.conf
LIMITS_SRC=$SCRIPT_DIR/limits-kometa.conf
UNIT_SRC=$SCRIPT_DIR/kometa.service
CHECK=$SCRIPT_DIR/check.sh

SYSCTL_DST=/etc/sysctl.d/99-kometa.conf
LIMITS_DST=/etc/security/limits.d/kometa.conf
UNIT_DST=/etc/systemd/system/kometa.service
CONFIG_DIR=/etc/kometa
CONFIG_FILE=$CONFIG_DIR/kometa.toml
BINARY=/usr/local/bin/kometa
KOMETA_USER=kometa

usage() {
    cat <<EOF
Usage: $(basename "$0") [--dry-run] [--with-systemd] [--help]

Installs Kometa's host tuning (run as root):
  1. $SYSCTL_SRC
       -> $SYSCTL_DST (applied at every boot by systemd-sysctl)
     and applies it now, key by key (like 'sysctl -p FILE', but keys with a
     leading '-' are skipped when absent, e.g. nf_conntrack not loaded, and
     a live value that already exceeds a recommended minimum is not lowered)
  2. creates the system user '$KOMETA_USER' if missing
  3. $LIMITS_SRC
       -> $LIMITS_DST (PAM sessions of '$KOMETA_USER'; next login)
  4. with --with-systemd:
     $UNIT_SRC
       -> $UNIT_DST, creates $CONFIG_DIR, runs 'systemctl daemon-reload'.
     It does not enable or start the service.
  5. runs check.sh to show the result.

Safe to run again: unchanged files and values are left alone.

  --dry-run        print what would be done (with diffs), change nothing;
                   works without root
  --with-systemd   also install the systemd unit
  -h, --help       this text
EOF
}

DRY_RUN=0
WITH_SYSTEMD=0
while (($#)); do
    case $1 in
        --dry-run | -n) DRY_RUN=1 ;;
        --with-systemd) WITH_SYSTEMD=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "apply.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() {
    echo "apply.sh: $*" >&2
    exit 1
}
step() { printf '\n== %s\n' "$*"; }
say() { printf '  %s\n' "$*"; }

# run CMD...: execute, or only print it under --dry-run.
run() {
    if ((DRY_RUN)); then
        printf '  [dry-run]%s\n' "$(printf ' %q' "$@")"
    else
        printf '  +%s\n' "$(printf ' %q' "$@")"
        "$@"
    fi
}

# --- preconditions ---------------------------------------------------------------

if ((EUID != 0)); then
    if ((DRY_RUN)); then
        echo "note: not running as root; this dry run only shows what root would do."
    else
        die "must run as root: it writes $SYSCTL_DST and $LIMITS_DST,
changes live kernel settings under /proc/sys, may create the '$KOMETA_USER' user
and, with --with-systemd, installs $UNIT_DST.
Re-run with sudo, or use --dry-run to see what it would do."
    fi
fi

for f in "$SYSCTL_SRC" "$LIMITS_SRC"; do
    [[ -r $f ]] || die "missing $f (run this script from the tuning/ directory of a Kometa checkout)"
done
if ((WITH_SYSTEMD)); then
    [[ -r $UNIT_SRC ]] || die "missing $UNIT_SRC"
fi
for tool in sysctl install cmp getent; do
    command -v "$tool" >/dev/null || die "'$tool' not found in PATH"
done

# satisfied POLICY RECOMMENDED CURRENT: true when the live value already meets
# the recommendation, so it need not (and, for minimums, must not) be written.
satisfied() {
    local policy=$1 rec cur i c
    local -a rf cf
    rec=$(normalize "$2")
    cur=$(normalize "$3")
    [[ $rec == "$cur" ]] && return 0
    read -r -a rf <<<"$rec"
    read -r -a cf <<<"$cur"
    case $policy in
        at-least | at-most)
            ((${#rf[@]} == ${#cf[@]})) || return 1
            for i in "${!rf[@]}"; do
                is_uint "${rf[i]}" && is_uint "${cf[i]}" || return 1
                c=$(num_cmp "${cf[i]}" "${rf[i]}")
                [[ $policy == at-least && $c == -1 ]] && return 1
                [[ $policy == at-most && $c == 1 ]] && return 1
            done
            return 0
            ;;
        covers)
            ((${#rf[@]} == 2 && ${#cf[@]} == 2)) || return 1
            is_uint "${rf[0]}${rf[1]}${cf[0]}${cf[1]}" || return 1
            [[ $(num_cmp "${cf[0]}" "${rf[0]}") != 1 && $(num_cmp "${cf[1]}" "${rf[1]}") != -1 ]]
            ;;
        *) return 1 ;;
    esac
}

# install_file SRC DST MODE: copy when DST is missing or differs. Returns 0
# when it (would have) changed something, 1 when DST was already identical.
install_file() {
    local src=$1 dst=$2 mode=$3
    if [[ -f $dst ]] && cmp -s "$src" "$dst"; then
        say "unchanged: $dst"
        return 1
    fi
    if [[ -f $dst ]]; then
        say "updating $dst:"
        diff -u "$dst" "$src" | sed 's/^/    /' || true
    else
        say "new file: $dst"
    fi
    run install -D -m "$mode" -o root -g root "$src" "$dst"
    return 0
}

PARSED=$(parse_sysctl_file "$SYSCTL_SRC" apply.sh) || die "cannot parse $SYSCTL_SRC (see above)"
[[ -n $PARSED ]] || die "no settings found in $SYSCTL_SRC"
mapfile -t SETTINGS <<<"$PARSED"

# Refuse before changing anything if a mandatory key does not exist here.
for s in "${SETTINGS[@]}"; do
    IFS=$'\t' read -r _ optional key _ <<<"$s"
    if [[ $optional == 0 && ! -e /proc/sys/${key//.//} ]]; then
        die "$key does not exist on this kernel ($(uname -r)); remove it from $SYSCTL_SRC or prefix it with '-'"
    fi
done

FAILURES=()

# --- 1. sysctl ---------------------------------------------------------------------

step "sysctl: $SYSCTL_DST"
install_file "$SYSCTL_SRC" "$SYSCTL_DST" 0644 || true

step "sysctl: live values (/proc/sys)"
for s in "${SETTINGS[@]}"; do
    IFS=$'\t' read -r policy optional key rec <<<"$s"
    path=/proc/sys/${key//.//}
    if [[ ! -e $path ]]; then
        say "skip $key: not present (optional; e.g. module not loaded)"
        continue
    fi
    cur=$(normalize "$(cat "$path")")
    if [[ $cur == "$rec" ]]; then
        say "ok   $key = $cur"
    elif satisfied "$policy" "$rec" "$cur"; then
        say "keep $key = $cur (already satisfies $policy $rec; not changed now, the boot-time file sets $rec)"
    elif ! run sysctl -q -w "$key=$rec"; then
        FAILURES+=("sysctl $key")
    fi
done

# --- 2. user ---------------------------------------------------------------------

step "user: $KOMETA_USER"
if getent passwd "$KOMETA_USER" >/dev/null; then
    say "exists: $(getent passwd "$KOMETA_USER")"
else
    command -v useradd >/dev/null || die "useradd not found; create the system user '$KOMETA_USER' by hand"
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    run useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell "$nologin" --comment "Kometa push server" "$KOMETA_USER" ||
        FAILURES+=("useradd $KOMETA_USER")
fi

# --- 3. limits -------------------------------------------------------------------

step "limits: $LIMITS_DST"
# After the sysctls: a nofile hard limit above fs.nr_open would make
# pam_limits refuse the user's sessions.
install_file "$LIMITS_SRC" "$LIMITS_DST" 0644 || true
say "takes effect for sessions started from now on; kometa.service sets its own limits"

# --- 4. systemd ------------------------------------------------------------------

if ((WITH_SYSTEMD)); then
    step "systemd: $UNIT_DST"
    command -v systemctl >/dev/null || die "--with-systemd given but systemctl not found"
    if [[ -d $CONFIG_DIR ]]; then
        say "exists: $CONFIG_DIR"
    else
        run install -d -m 0750 -o root -g "$KOMETA_USER" "$CONFIG_DIR" || FAILURES+=("mkdir $CONFIG_DIR")
    fi
    if install_file "$UNIT_SRC" "$UNIT_DST" 0644; then
        if [[ -d /run/systemd/system ]]; then
            run systemctl daemon-reload || FAILURES+=("systemctl daemon-reload")
        else
            say "systemd is not running here (container?): skipped daemon-reload"
        fi
    fi
    [[ -x $BINARY ]] || say "warning: $BINARY is missing: install the kometa binary there"
    [[ -e $CONFIG_FILE ]] || say "warning: $CONFIG_FILE is missing: create it (set admin = \"unix:/run/kometa/admin.sock\")"
    say "then: systemctl enable --now kometa && journalctl -u kometa -f"
fi

# --- 5. verify -------------------------------------------------------------------

if [[ -x $CHECK ]]; then
    if ((DRY_RUN)); then
        step "current state (check.sh; the dry run changed nothing)"
    else
        step "result (check.sh)"
    fi
    "$CHECK" --file "$SYSCTL_SRC" | sed '/./s/^/  /' || true
fi

if ((${#FAILURES[@]})); then
    printf '\napply.sh: failed: %s\n' "${FAILURES[*]}" >&2
    exit 1
fi
if ((DRY_RUN)); then
    printf '\nDry run: nothing was changed.\n'
else
    printf '\nDone.\n'
fi
