# shellcheck shell=bash
# Sourced by scripts/test and scripts/demo: the Debian packages they need and
# how to get them. Not executable on its own.

# Building the module, its unit tests and the bundled CardScan mock.
CS_BUILD_PACKAGES="build-essential autoconf automake libtool pkg-config apache2 apache2-dev
libcurl4-openssl-dev libcjson-dev libssl-dev libhiredis-dev libmemcached-dev
check openssl curl"
# shellcheck disable=SC2034 # used by scripts/test
# Running the whole test suite: the above plus sanitizers, valgrind, the
# Python integration tests, the shared-cache backends, a browser, node
# (its http2 module is the HTTP/2 upstream of test_hardening) and promtool
# (Debian 12 ships it in the prometheus package) for the alerting rules
# (checked by the rules stage, and live by test_soak.py).
CS_TEST_PACKAGES="$CS_BUILD_PACKAGES python3 valgrind clang redis-server memcached chromium nodejs prometheus"
# shellcheck disable=SC2034 # used by scripts/compat
# scripts/compat: building httpd 2.4.37 (PCRE 1, Debian's APR), curl from its
# git tree, cJSON with cmake.
CS_COMPAT_PACKAGES="libpcre3-dev libapr1-dev libaprutil1-dev cmake"

cs_missing_packages() {
    local installed p missing=""
    # one dpkg-query for all: "name status" of those dpkg knows
    installed=$(dpkg-query -W -f='${Package} ${Status}\n' "$@" 2>/dev/null |
        awk '$2 == "install" && $4 == "installed" { print $1 }' || true)
    for p in "$@"; do
        if ! grep -qx -- "$p" <<<"$installed"; then
            missing="$missing $p"
        fi
    done
    echo "${missing# }"
}

# cs_ensure_packages PKG...: install what is missing (root), or say what to
# install and exit 1 (not root). Does nothing when everything is installed.
cs_ensure_packages() {
    local missing
    if ! command -v dpkg-query >/dev/null 2>&1; then
        echo "note: not a Debian-like system (no dpkg-query): install the equivalents of: $*" >&2
        return 0
    fi
    # shellcheck disable=SC2048,SC2086 # the lists are words
    missing=$(cs_missing_packages $*)
    if [ -z "$missing" ]; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: $missing" >&2
        echo "install them first:  sudo apt-get install -y --no-install-recommends $missing" >&2
        echo "(or run this script with sudo, which installs them)" >&2
        exit 1
    fi
    echo "installing: $missing"
    export DEBIAN_FRONTEND=noninteractive
    # one update per run: .ci/run's second script finds the lists fresh
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -60 2>/dev/null | head -1)" ]; then
        apt-get -o DPkg::Lock::Timeout=600 update
    fi
    # shellcheck disable=SC2086
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends $missing
    # apache2's postinst may start the distribution's own apache2 service; the
    # tests and the demo run their own instances and need no system one.
}
