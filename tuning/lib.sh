# shellcheck shell=bash
# lib.sh -- helpers shared by apply.sh and check.sh.
#
# Sourced, not executed: `. "$SCRIPT_DIR/lib.sh"`. It only defines functions
# and sets nothing else:
#   parse_sysctl_file FILE PROG [NOTE]  sysctl-kometa.conf -> one
#                                       "policy<TAB>optional<TAB>key<TAB>value"
#                                       line per setting
#   normalize STRING                    collapse blanks, trim the ends
#   is_uint STRING                      true for a non-negative decimal integer
#   num_cmp A B                         prints -1, 0 or 1
# The callers run under `set -u` (apply.sh also `set -e`) and LC_ALL=C.

# parse_sysctl_file FILE PROG [NOTE]: sysctl.d file -> one
# "policy<TAB>optional<TAB>key<TAB>value" line per setting.
# `key = value` lines; '#' and ';' lines are comments; a leading '-' marks the
# key optional; a "# check: POLICY" comment applies to the next setting.
# A line without '=' is reported on stderr as "PROG: FILE:LINE: not a
# `key = value` line" followed by NOTE, and skipped; the remaining settings
# are still printed, and the status is then 1 (0 when every line parsed).
parse_sysctl_file() {
    awk -v prog="$2" -v note="${3:-}" '
        { sub(/\r$/, "") }
        /^[ \t]*#[ \t]*check:/ {
            p = $0
            sub(/^[ \t]*#[ \t]*check:[ \t]*/, "", p)
            sub(/[ \t]+$/, "", p)
            policy = p
            next
        }
        /^[ \t]*([#;]|$)/ { next }
        {
            line = $0
            sub(/^[ \t]+/, "", line)
            optional = 0
            if (substr(line, 1, 1) == "-") { optional = 1; line = substr(line, 2) }
            eq = index(line, "=")
            if (eq == 0) {
                printf "%s: %s:%d: not a `key = value` line%s\n", prog, FILENAME, NR, note > "/dev/stderr"
                bad = 1
                next
            }
            key = substr(line, 1, eq - 1)
            value = substr(line, eq + 1)
            gsub(/^[ \t]+|[ \t]+$/, "", key)
            gsub(/^[ \t]+|[ \t]+$/, "", value)
            gsub(/[ \t]+/, " ", value)
            gsub(/\//, ".", key)
            printf "%s\t%d\t%s\t%s\n", (policy == "" ? "exact" : policy), optional, key, value
            policy = ""
        }
        END { exit bad }
    ' "$1"
}

# Collapse runs of blanks/tabs into single spaces, trim the ends.
normalize() {
    local -a f
    read -r -a f <<<"$1"
    printf '%s' "${f[*]}"
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# Compare two non-negative decimal integers of any length: prints -1, 0 or 1.
num_cmp() {
    local a=$1 b=$2
    a=${a#"${a%%[!0]*}"}
    b=${b#"${b%%[!0]*}"}
    a=${a:-0}
    b=${b:-0}
    if ((${#a} != ${#b})); then
        if ((${#a} < ${#b})); then echo -1; else echo 1; fi
    elif [[ $a == "$b" ]]; then
        echo 0
    elif [[ $a < $b ]]; then
        echo -1
    else
        echo 1
    fi
}
