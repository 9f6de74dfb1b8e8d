#!/bin/sh
# The one install step of sam3-serve. `make install` and both images (docker/Dockerfile, docker/Dockerfile.gpu)
# run it, so an image holds what the suite ran on; tests/unit/test_container.py fails if they stop doing so.
#
#   sh requirements/install.sh deps PYTHON LOCK        LOCK (cpu.lock or cuda.lock), then no-deps.lock
#   sh requirements/install.sh project PYTHON ARG...   the project itself (`-e .` for make, `.` for an image),
#                                                      then pip check
#
# Nothing is resolved here: `make lock` resolved the whole environment into the lock, so pip installs exactly
# its pins (--no-deps) and every file it downloads must match one of the lock's hashes (--require-hashes).
# torch is one of those pins: cpu.lock names its +cpu build, so a CPU machine never gets the CUDA stack.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
no_deps_lock="$here/no-deps.lock"

die() { printf 'requirements/install.sh: %s\n' "$*" >&2; exit 1; }

pip_install_lock() {  # PYTHON LOCK
	[ -f "$2" ] || die "no lock file $2 (\`make lock\` writes requirements/*.lock)"
	"$1" -m pip install --quiet --require-hashes --no-deps -r "$2" || die "pip could not install $2. \
'No matching distribution' for torch ...+cpu: pip must be told where PyTorch's CPU wheels are (pip.conf or \
PIP_EXTRA_INDEX_URL, docs/deploy.md); 'THESE PACKAGES DO NOT MATCH THE HASHES': a file differs from the one \
locked (a changed mirror, or a lock edited by hand: run \`make lock\`)."
}

# pip check, except what no-deps.lock's packages require: they are installed without their dependencies on purpose
check() {  # PYTHON
	allowed=" $(sed -n 's/^\([A-Za-z0-9][A-Za-z0-9._-]*\)==.*/\1/p' "$no_deps_lock" | tr 'A-Z_.' 'a-z--' | tr '\n' ' ')"
	report=$("$1" -m pip check 2>&1) && return 0
	broken=$(printf '%s\n' "$report" | while IFS= read -r line; do
		name=$(printf '%s' "${line%% *}" | tr 'A-Z_.' 'a-z--')
		case "$allowed" in *" $name "*) ;; *) printf '%s\n' "$line" ;; esac
	done)
	[ -z "$broken" ] && return 0
	printf '%s\n' "$broken" >&2
	die "broken requirements (above). A requirement of sam3-serve itself missing or unmet means pyproject.toml \
changed without \`make lock\`."
}

[ $# -ge 2 ] || die "usage: install.sh deps PYTHON LOCK | install.sh project PYTHON PIP-ARG..."
step=$1 python=$2
shift 2
case "$step" in
deps)
	[ $# -eq 1 ] || die "usage: install.sh deps PYTHON LOCK"
	pip_install_lock "$python" "$1"
	pip_install_lock "$python" "$no_deps_lock"
	;;
project)
	[ $# -ge 1 ] || die "usage: install.sh project PYTHON PIP-ARG... (e.g. -e . or .)"
	# its build backend (setuptools) is in the lock too: no build environment fetched from an index
	"$python" -m pip install --quiet --no-deps --no-build-isolation "$@" || die "pip could not install the project ($*)"
	check "$python"
	;;
*) die "unknown step '$step': deps or project" ;;
esac
