# Helpers shared by the launch scripts; sourced, not run. The sourcing script sets LAUNCHER
# (its name, for messages) first, and `args` (its lbq.main flags) before calling has_flag.

die() {
  echo "$LAUNCHER: error: $*" >&2
  exit 2
}

# The comment block at the top of the launching script.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

# Whether the lbq.main arguments hold flag $1 (as --flag=VALUE or --flag VALUE).
has_flag() {
  local arg
  for arg in "${args[@]}"; do
    [[ $arg == "$1" || $arg == "$1="* ]] && return 0
  done
  return 1
}

# Prints a command, quoted so that it can be pasted into a shell.
show() {
  local out="" word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$word "
    elif [[ $word =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
      out+="${BASH_REMATCH[1]}$(single_quote "${BASH_REMATCH[2]}") "
    else
      out+="$(single_quote "$word") "
    fi
  done
  echo "+ ${out% }"
}

# Wraps a word in single quotes for the shell.
single_quote() {
  local q="'\\''"
  echo "'${1//\'/$q}'"
}
