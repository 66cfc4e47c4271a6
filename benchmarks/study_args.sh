# Sourced by the study scripts with their further `--section.key VALUE` arguments ("$@"). Sets, quoted for
# `eval "local x=($VAR)"` (so they survive export into xargs workers):
#   EXTRA         every pair (for the transfers);
#   COMMON_EXTRA  the data/train/log pairs only (for the stages without loss/sampler/teacher sections).
EXTRA="" COMMON_EXTRA=""
_study_args=("$@")
for (( _i = 0; _i + 1 < ${#_study_args[@]}; _i += 2 )); do
  case ${_study_args[_i]} in
    --data.*|--train.*|--log.*) COMMON_EXTRA+=$(printf '%q %q ' "${_study_args[_i]}" "${_study_args[_i + 1]}");;
  esac
done
[ $# -eq 0 ] || EXTRA=$(printf '%q ' "$@")
