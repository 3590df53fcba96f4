#!/usr/bin/env bash
# check.sh -- compare this host with Kometa's tuning recommendations.
#
# Changes NOTHING and runs as any user. The recommended sysctl values are read
# from sysctl-kometa.conf itself (so the file and this check never disagree),
# the recommended limits from limits-kometa.conf and kometa.service.
# See docs/tuning.md.

set -uo pipefail
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# parse_sysctl_file, normalize, is_uint, num_cmp (shared with apply.sh).
# shellcheck source=SCRIPTDIR/lib.sh
. "$SCRIPT_DIR/lib.sh"

usage() {
    cat <<EOF
Usage: $(basename "$0") [--strict] [--file SYSCTL_FILE] [--help]

Compares the live kernel settings (/proc/sys) and resource limits of this host
with Kometa's recommendations and prints a table. Changes nothing; any user.

  --strict        exit 1 if any checked item is not OK (default: always exit 0)
  --file PATH     sysctl file to compare against (default: sysctl-kometa.conf
                  next to this script, else /etc/sysctl.d/99-kometa.conf)
  -h, --help      this text

Statuses:
  OK         live value satisfies the recommendation
  LOW        below a recommended minimum (or a port range narrower than it)
  HIGH       above a recommended maximum
  DIFFERENT  not equal where an exact value is recommended
  MISSING    the key does not exist on this kernel (for keys marked optional
             with a leading '-', e.g. nf_conntrack not loaded, this is fine and
             does not fail --strict)
  INFO       shown for reference, never fails --strict

Run it as the kometa user (sudo -u kometa $0) to check the PAM limits from
limits-kometa.conf; a running kometa process is checked against kometa.service.
Exit status: 0, or 1 with --strict when something is not OK; 2 on usage errors.
EOF
}

STRICT=0
SYSCTL_FILE=""
while (($#)); do
    case $1 in
        --strict) STRICT=1 ;;
        --file)
            [[ $# -ge 2 ]] || { echo "check.sh: --file needs a path" >&2; exit 2; }
            SYSCTL_FILE=$2
            shift
            ;;
        --file=*) SYSCTL_FILE=${1#--file=} ;;
        -h | --help) usage; exit 0 ;;
        *) echo "check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# First existing file of the arguments, or nothing.
first_file() {
    local f
    for f in "$@"; do
        [[ -n $f && -r $f ]] && { printf '%s\n' "$f"; return 0; }
    done
    return 1
}

if [[ -z $SYSCTL_FILE ]]; then
    SYSCTL_FILE=$(first_file "$SCRIPT_DIR/sysctl-kometa.conf" /etc/sysctl.d/99-kometa.conf) || {
        echo "check.sh: no sysctl-kometa.conf next to this script and no /etc/sysctl.d/99-kometa.conf" >&2
        exit 2
    }
elif [[ ! -r $SYSCTL_FILE ]]; then
    echo "check.sh: cannot read $SYSCTL_FILE" >&2
    exit 2
fi
LIMITS_FILE=$(first_file "$SCRIPT_DIR/limits-kometa.conf" /etc/security/limits.d/kometa.conf) || LIMITS_FILE=""
UNIT_FILE=$(first_file "$SCRIPT_DIR/kometa.service" /etc/systemd/system/kometa.service) || UNIT_FILE=""

FAILED=0   # items that are not OK (counted for --strict)

# compare POLICY RECOMMENDED CURRENT -> prints a status word.
compare() {
    local policy=$1 rec cur i c
    local -a rf cf
    rec=$(normalize "$2")
    cur=$(normalize "$3")
    read -r -a rf <<<"$rec"
    read -r -a cf <<<"$cur"
    case $policy in
        exact)
            [[ $rec == "$cur" ]] && echo OK || echo DIFFERENT
            ;;
        at-least | at-most)
            if ((${#rf[@]} != ${#cf[@]})); then echo DIFFERENT; return; fi
            for i in "${!rf[@]}"; do
                if ! is_uint "${rf[i]}" || ! is_uint "${cf[i]}"; then
                    [[ ${rf[i]} == "${cf[i]}" ]] || { echo DIFFERENT; return; }
                    continue
                fi
                c=$(num_cmp "${cf[i]}" "${rf[i]}")
                if [[ $policy == at-least && $c == -1 ]]; then echo LOW; return; fi
                if [[ $policy == at-most && $c == 1 ]]; then echo HIGH; return; fi
            done
            echo OK
            ;;
        covers)
            if ((${#rf[@]} != 2 || ${#cf[@]} != 2)) || ! is_uint "${rf[0]}${rf[1]}${cf[0]}${cf[1]}"; then
                echo DIFFERENT
            elif [[ $(num_cmp "${cf[0]}" "${rf[0]}") != 1 && $(num_cmp "${cf[1]}" "${rf[1]}") != -1 ]]; then
                echo OK
            else
                echo LOW
            fi
            ;;
        *)
            echo "check.sh: unknown policy '$policy', comparing exactly" >&2
            [[ $rec == "$cur" ]] && echo OK || echo DIFFERENT
            ;;
    esac
}

# --- table output ----------------------------------------------------------------

T_NAME=() T_REC=() T_CUR=() T_STATUS=() T_NOTE=()

row() {
    T_NAME+=("$1") T_REC+=("$2") T_CUR+=("$3") T_STATUS+=("$4") T_NOTE+=("${5:-}")
}

# flush_table TITLE FIRST_COLUMN_HEADER: print the collected rows, aligned.
flush_table() {
    local title=$1 head=$2 i w1=${#2} w2=11 w3=7
    for i in "${!T_NAME[@]}"; do
        ((${#T_NAME[i]} > w1)) && w1=${#T_NAME[i]}
        ((${#T_REC[i]} > w2)) && w2=${#T_REC[i]}
        ((${#T_CUR[i]} > w3)) && w3=${#T_CUR[i]}
    done
    printf '\n%s\n' "$title"
    printf '  %-*s  %-*s  %-*s  %s\n' "$w1" "$head" "$w2" RECOMMENDED "$w3" CURRENT STATUS
    for i in "${!T_NAME[@]}"; do
        if [[ -n ${T_NOTE[i]} ]]; then
            printf '  %-*s  %-*s  %-*s  %-10s %s\n' "$w1" "${T_NAME[i]}" "$w2" "${T_REC[i]}" \
                "$w3" "${T_CUR[i]}" "${T_STATUS[i]}" "${T_NOTE[i]}"
        else
            printf '  %-*s  %-*s  %-*s  %s\n' "$w1" "${T_NAME[i]}" "$w2" "${T_REC[i]}" \
                "$w3" "${T_CUR[i]}" "${T_STATUS[i]}"
        fi
    done
    T_NAME=() T_REC=() T_CUR=() T_STATUS=() T_NOTE=()
}

# count STATUS: bump FAILED for anything that is not OK / INFO.
count() {
    case $1 in OK | INFO) ;; *) FAILED=$((FAILED + 1)) ;; esac
}

# Pages -> "x.y GiB" (or MiB below 1 GiB).
pages_human() {
    awk -v p="$1" -v s="$PAGE_SIZE" 'BEGIN {
        b = p * s
        if (b >= 1073741824) printf "%.1f GiB", b / 1073741824
        else printf "%.1f MiB", b / 1048576
    }'
}

# --- host facts ----------------------------------------------------------------

PAGE_SIZE=$(getconf PAGESIZE 2>/dev/null || echo 4096)
KERNEL=$(uname -r)
CPUS_ONLINE=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo "?")
CPUS_USABLE=$(nproc 2>/dev/null || echo "?")
MEM_KB=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo 2>/dev/null)
MEM_GIB=$(awk -v k="${MEM_KB:-0}" 'BEGIN { printf "%.1f", k / 1048576 }')

echo "Kometa host check (read-only)"
echo "  recommendations: $SYSCTL_FILE"
[[ -n $LIMITS_FILE ]] && echo "                   $LIMITS_FILE"
[[ -n $UNIT_FILE ]] && echo "                   $UNIT_FILE"
echo "  kernel $KERNEL ($(uname -m)), $CPUS_ONLINE CPUs online ($CPUS_USABLE usable here), RAM $MEM_GIB GiB, page $PAGE_SIZE B"

# --- kernel settings -------------------------------------------------------------

# A malformed line is reported by parse_sysctl_file and skipped; its exit
# status is not looked at here (it does not fail the check or --strict).
while IFS=$'\t' read -r policy optional key rec; do
    path=/proc/sys/${key//.//}
    note=""
    if [[ ! -e $path ]]; then
        cur="-"
        status=MISSING
        if [[ $optional == 1 ]]; then
            case $key in
                net.netfilter.*) note="(nf_conntrack not loaded: nothing to size)" ;;
                *) note="(optional key, absent on this kernel)" ;;
            esac
            row "$key" "$rec" "$cur" "$status" "$note"
            continue
        fi
        note="(not on this kernel or not visible in this namespace)"
    elif ! cur=$(cat "$path" 2>/dev/null); then
        cur="?"
        status=UNREADABLE
        note="(permission denied; try as root)"
    else
        cur=$(normalize "$cur")
        status=$(compare "$policy" "$rec" "$cur")
        case $status in
            LOW) [[ $policy == covers ]] && note="(narrower range)" || note="(want >= recommended)" ;;
            HIGH) note="(want <= recommended)" ;;
            DIFFERENT) note="(want exactly the recommended value)" ;;
        esac
        if [[ $key == net.ipv4.tcp_mem ]]; then
            read -r -a _r <<<"$rec"
            read -r -a _c <<<"$cur"
            note="(pages; max = $(pages_human "${_r[2]:-0}") recommended, $(pages_human "${_c[2]:-0}") now)"
        fi
    fi
    count "$status"
    row "$key" "$rec" "$cur" "$status" "$note"
done < <(parse_sysctl_file "$SYSCTL_FILE" check.sh ", ignored")
flush_table "Kernel settings (/proc/sys)" SETTING

# --- resource limits ---------------------------------------------------------------

# Recommended limit from limits.d: limits_value TYPE ITEM (first matching line).
limits_value() {
    [[ -n $LIMITS_FILE ]] || return 1
    awk -v t="$1" -v item="$2" '
        /^[ \t]*(#|$)/ { next }
        ($2 == t || $2 == "-") && $3 == item { print $4; found = 1; exit }
        END { exit !found }
    ' "$LIMITS_FILE"
}
LIMITS_USER=$([[ -n $LIMITS_FILE ]] && awk '/^[ \t]*(#|$)/ { next } { print $1; exit }' "$LIMITS_FILE")
LIMITS_USER=${LIMITS_USER:-kometa}

# Unit limit (LimitNOFILE / LimitMEMLOCK) -> value in the unit's terms.
unit_value() {
    [[ -n $UNIT_FILE ]] || return 1
    awk -F= -v k="$1" '$1 == k { v = $2 } END { if (v == "") exit 1; print v }' "$UNIT_FILE"
}

# Normalize a limit for comparison: "unlimited"/"infinity" -> unlimited; a
# number with an optional K/M/G/T suffix -> that number times SCALE_UNIT.
# limit_norm VALUE DIVISOR: returns the value divided by DIVISOR (bytes->KiB).
limit_norm() {
    local v=$1 div=${2:-1} mult=1
    case $v in
        unlimited | infinity | "") echo unlimited; return ;;
    esac
    case $v in
        *[Kk]) mult=1024; v=${v%?} ;;
        *[Mm]) mult=$((1024 ** 2)); v=${v%?} ;;
        *[Gg]) mult=$((1024 ** 3)); v=${v%?} ;;
        *[Tt]) mult=$((1024 ** 4)); v=${v%?} ;;
    esac
    is_uint "$v" || { echo "$1"; return; }
    echo $((v * mult / div))
}

# limit_status RECOMMENDED CURRENT -> OK / LOW.
limit_status() {
    local rec=$1 cur=$2
    [[ $rec == unlimited ]] && { [[ $cur == unlimited ]] && echo OK || echo LOW; return; }
    [[ $cur == unlimited ]] && { echo OK; return; }
    if is_uint "$rec" && is_uint "$cur" && [[ $(num_cmp "$cur" "$rec") != -1 ]]; then echo OK; else echo LOW; fi
}

ME=$(id -un 2>/dev/null || echo "uid $(id -u)")
if [[ $ME == "$LIMITS_USER" ]]; then
    shell_counts=1
    shell_note=""
else
    shell_counts=0
    shell_note="(limits.d applies to user $LIMITS_USER, you are $ME)"
fi
for spec in "soft nofile -Sn 1" "hard nofile -Hn 1" "soft memlock -Sl 1" "hard memlock -Hl 1"; do
    read -r type item flag _ <<<"$spec"
    rec=$(limits_value "$type" "$item") || rec="-"
    rec=$(limit_norm "$rec")
    cur=$(ulimit "$flag")
    unit=""
    [[ $item == memlock ]] && unit=" (KiB)"
    if [[ $rec == "-" ]]; then
        status=INFO
    else
        status=$(limit_status "$rec" "$cur")
        if ((shell_counts)); then count "$status"; else status=INFO; fi
    fi
    row "$item $type$unit, this shell" "$rec" "$cur" "$status" "$shell_note"
done

# A running server: compare its real limits with the unit's.
KOMETA_PID=$(pgrep -x kometa 2>/dev/null | head -n 1)
if [[ -n $KOMETA_PID && -r /proc/$KOMETA_PID/limits ]]; then
    rec_n=$(limit_norm "$(unit_value LimitNOFILE || echo 2097152)")
    rec_l=$(limit_norm "$(unit_value LimitMEMLOCK || echo infinity)" 1024)
    while read -r what soft hard; do
        if [[ $what == nofile ]]; then rec=$rec_n; div=1; u=""; else rec=$rec_l; div=1024; u=" (KiB)"; fi
        for pair in "soft:$soft" "hard:$hard"; do
            cur=$(limit_norm "${pair#*:}" "$div")
            status=$(limit_status "$rec" "$cur")
            count "$status"
            row "$what ${pair%%:*}$u, kometa pid $KOMETA_PID" "$rec" "$cur" "$status"
        done
    done < <(awk '
        /^Max open files/    { print "nofile", $4, $5 }
        /^Max locked memory/ { print "memlock", $4, $5 }
    ' "/proc/$KOMETA_PID/limits")
elif [[ -n $KOMETA_PID ]]; then
    row "kometa pid $KOMETA_PID" "-" "?" INFO "(cannot read /proc/$KOMETA_PID/limits; run as root or kometa)"
else
    row "kometa process" "-" "not running" INFO "(its limits are checked when it runs)"
fi
flush_table "Resource limits" LIMIT

# --- runtime ---------------------------------------------------------------------

# Kernel version: glommio needs io_uring features from Linux 5.8 on.
if [[ $KERNEL =~ ^([0-9]+)\.([0-9]+) ]] &&
    ((BASH_REMATCH[1] > 5 || (BASH_REMATCH[1] == 5 && BASH_REMATCH[2] >= 8))); then
    status=OK
else
    status=LOW
fi
count "$status"
row "kernel version" ">= 5.8" "$KERNEL" "$status" "(glommio minimum)"

# io_uring availability: kernel.io_uring_disabled exists since Linux 6.6.
if [[ -r /proc/sys/kernel/io_uring_disabled ]]; then
    cur=$(cat /proc/sys/kernel/io_uring_disabled)
    case $cur in
        0) status=OK note="(enabled)" ;;
        1)
            status=RESTRICTED
            group=$(cat /proc/sys/kernel/io_uring_group 2>/dev/null || echo -1)
            if [[ $group == -1 ]]; then
                note="(only CAP_SYS_ADMIN processes may use io_uring; set kernel.io_uring_disabled=0)"
            else
                note="(only members of gid $group; add the kometa user or set kernel.io_uring_disabled=0)"
            fi
            ;;
        *) status=DISABLED note="(io_uring off: Kometa cannot run; set kernel.io_uring_disabled=0)" ;;
    esac
    count "$status"
    row "kernel.io_uring_disabled" 0 "$cur" "$status" "$note"
else
    row "kernel.io_uring_disabled" 0 "-" INFO "(knob absent before Linux 6.6: io_uring enabled if built in)"
fi

row "CPUs online / usable here" "-" "$CPUS_ONLINE / $CPUS_USABLE" INFO "(one shard per usable core by default)"
row "memory" "-" "$MEM_GIB GiB" INFO
# Kometa opts itself out of transparent huge pages (transparent_huge_pages =
# false, the default), so the host mode is only for reference.
if [[ -r /sys/kernel/mm/transparent_hugepage/enabled ]]; then
    thp_mode=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/mm/transparent_hugepage/enabled)
    row "transparent huge pages" "-" "${thp_mode:-?}" INFO "(kometa disables them for itself: see docs/tuning.md)"
fi

# Current usage, for reading alongside docs/tuning.md.
if [[ -r /proc/sys/fs/file-nr ]]; then
    read -r fopen _ fmax </proc/sys/fs/file-nr
    row "open files (fs.file-nr)" "-" "$fopen of $fmax" INFO
fi
if [[ -r /proc/net/sockstat ]]; then
    tcp_line=$(awk '$1 == "TCP:" { for (i = 2; i < NF; i += 2) printf "%s %s ", $i, $(i + 1) }' /proc/net/sockstat)
    tcp_mem_pages=$(awk '$1 == "TCP:" { for (i = 2; i < NF; i += 2) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat)
    row "TCP sockets (/proc/net/sockstat)" "-" "${tcp_line% }" INFO "(mem is in pages: $(pages_human "${tcp_mem_pages:-0}"))"
fi
flush_table "Runtime" ITEM

echo
if ((FAILED)); then
    echo "$FAILED item(s) not OK. To apply the recommendations: sudo $SCRIPT_DIR/apply.sh (try --dry-run first)."
else
    echo "All checked items OK."
fi

if ((STRICT && FAILED)); then
    exit 1
fi
exit 0
