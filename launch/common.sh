# Shared helpers for the launch scripts; source it, do not run it.
#
# Every command that touches the outside world goes through `run`, which prints
# it first (shell-quoted, so it can be pasted) and skips it under --dry-run.
# Read-only queries (does the bucket exist?) go through `query`: they run even
# in a dry run when the tool is installed, so a dry run still catches typos.

DRY_RUN=${DRY_RUN:-0}

die() {
  echo "error: $*" >&2
  exit 2
}

note() {
  echo "# $*"
}

# Quote one word for the shell, readably: bare when safe, else in single quotes.
shell_quote() {
  if [[ "$1" =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Join words into one shell command line.
quote_words() {
  local line="" word
  for word in "$@"; do line+="${line:+ }$(shell_quote "$word")"; done
  printf '%s' "$line"
}

# Print a command as one pasteable shell line.
show() {
  echo "+ $(quote_words "$@")"
}

run() {
  show "$@"
  if [[ "$DRY_RUN" == 1 ]]; then
    return 0
  fi
  "$@"
}

# Run a read-only query; returns 0/1 for success/failure, prints nothing of it.
# With no such tool in a dry run, it returns 3 ("unknown") instead.
query() {
  if ! command -v "$1" >/dev/null 2>&1; then
    [[ "$DRY_RUN" == 1 ]] && return 3
    die "'$1' not found on PATH (needed for: $*)"
  fi
  "$@" >/dev/null 2>&1
}

need_value() {  # need_value FLAG VALUE: a flag was given without its value
  [[ -n "${2:-}" && "${2:-}" != --* ]] || die "$1 needs a value"
}

need_set() {  # need_set FLAG VALUE: a required flag is missing
  [[ -n "${2:-}" ]] || die "missing required flag $1 (see --help)"
}

# The project root, so scripts work from any directory.
PROJECT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# A config is given as ml_collections does (`path[:args]`); the file must live in
# the project, relative to its root, because that is what the workers receive.
need_config_file() {
  local config=$1 file=${1%%:*}
  [[ "$file" != /* ]] \
    || die "--config must be relative to the project root (like configs/bert_base.py), got $config"
  [[ -f "$PROJECT_ROOT/$file" ]] \
    || die "config file not found: $PROJECT_ROOT/$file (from --config $config)"
}
