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
       $(basename "$0") --live-only [--keys KEY,...] [--record FILE] [--dry-run]
       $(basename "$0") --restore FILE [--dry-run]

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

Live-only mode, for a test run on a machine you do not want to reconfigure
(scripts/bench-million.sh uses it): only step 1's live values, nothing
written under /etc, no user, no limits file, no unit, no check.sh report.
  --live-only      apply the settings to /proc/sys only; list what changed
  --keys K1,K2     only these keys of $(basename "$SYSCTL_SRC")
  --record FILE    append "KEY<TAB>VALUE BEFORE" for every key changed
  --restore FILE   write such recorded values back (implies --live-only)
EOF
}

DRY_RUN=0
WITH_SYSTEMD=0
LIVE_ONLY=0
ONLY_KEYS=""
RECORD=""
RESTORE=""
while (($#)); do
    case $1 in
        --dry-run | -n) DRY_RUN=1 ;;
        --with-systemd) WITH_SYSTEMD=1 ;;
        --live-only) LIVE_ONLY=1 ;;
        --keys | --record | --restore)
            (($# >= 2)) || { echo "apply.sh: $1 needs a value (see --help)" >&2; exit 2; }
            case $1 in
                --keys) ONLY_KEYS=$2 ;;
                --record) RECORD=$2 ;;
                --restore) RESTORE=$2 LIVE_ONLY=1 ;;
            esac
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        *) echo "apply.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if ((!LIVE_ONLY)) && [[ -n $ONLY_KEYS$RECORD ]]; then
    echo "apply.sh: --keys and --record go with --live-only" >&2
    exit 2
fi
if ((LIVE_ONLY && WITH_SYSTEMD)); then
    echo "apply.sh: --with-systemd installs files; it does not go with --live-only" >&2
    exit 2
fi

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
    elif ((LIVE_ONLY)); then
        die "must run as root: it changes live kernel settings under /proc/sys. Use --dry-run to see what it would do."
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

# --restore FILE: put back what a --live-only --record run changed, newest
# first (a key recorded twice then ends at its oldest value).
if [[ -n $RESTORE ]]; then
    [[ -r $RESTORE ]] || die "cannot read $RESTORE"
    step "sysctl: restoring live values from $RESTORE"
    failed=0
    while IFS=$'\t' read -r key value; do
        [[ -n $key ]] || continue
        [[ $key =~ ^[a-z0-9_.-]+$ ]] || die "$RESTORE: '$key' is not a sysctl key"
        if run sysctl -q -w "$key=$value"; then
            ((DRY_RUN)) || say "restored: $key = $value"
        else
            failed=1
        fi
    done < <(tac "$RESTORE")
    ((failed)) && die "some values could not be restored (see above)"
    printf '\nRestored.\n'
    exit 0
fi

# --keys: only the listed settings, each of which must be in the file.
if [[ -n $ONLY_KEYS ]]; then
    IFS=',' read -r -a wanted <<<"$ONLY_KEYS"
    selected=()
    for key in "${wanted[@]}"; do
        found=""
        for s in "${SETTINGS[@]}"; do
            IFS=$'\t' read -r _ _ k _ <<<"$s"
            [[ $k == "$key" ]] && found=$s
        done
        [[ -n $found ]] || die "--keys: $key is not set in $SYSCTL_SRC"
        selected+=("$found")
    done
    SETTINGS=("${selected[@]}")
fi

# Refuse before changing anything if a mandatory key does not exist here.
for s in "${SETTINGS[@]}"; do
    IFS=$'\t' read -r _ optional key _ <<<"$s"
    if [[ $optional == 0 && ! -e /proc/sys/${key//.//} ]]; then
        die "$key does not exist on this kernel ($(uname -r)); remove it from $SYSCTL_SRC or prefix it with '-'"
    fi
done

FAILURES=()
CHANGED=()

# --- 1. sysctl ---------------------------------------------------------------------

if ((!LIVE_ONLY)); then
    step "sysctl: $SYSCTL_DST"
    install_file "$SYSCTL_SRC" "$SYSCTL_DST" 0644 || true
fi

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
        if ((LIVE_ONLY)); then
            say "keep $key = $cur (already satisfies $policy $rec)"
        else
            say "keep $key = $cur (already satisfies $policy $rec; not changed now, the boot-time file sets $rec)"
        fi
    elif run sysctl -q -w "$key=$rec"; then
        CHANGED+=("$key: $cur -> $rec")
        if [[ -n $RECORD ]] && ((!DRY_RUN)); then
            printf '%s\t%s\n' "$key" "$cur" >>"$RECORD"
        fi
    else
        FAILURES+=("sysctl $key")
    fi
done

if ((LIVE_ONLY)); then
    if ((${#CHANGED[@]} == 0)); then
        say "changed: nothing"
    elif ((DRY_RUN)); then
        for c in "${CHANGED[@]}"; do say "would change: $c"; done
    else
        for c in "${CHANGED[@]}"; do say "changed: $c"; done
    fi
    if ((${#FAILURES[@]})); then
        printf '\napply.sh: failed: %s\n' "${FAILURES[*]}" >&2
        exit 1
    fi
    exit 0
fi

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
