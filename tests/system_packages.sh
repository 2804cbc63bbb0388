#!/usr/bin/env bash
# System packages the tests need beyond Python's: PostgreSQL's initdb and pg_ctl, for the real database
# server of the multi-machine tests, and Chromium, the browser Playwright drives in the browser tests.
# Installed with apt-get when run as root, else asked for.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # useradd, and PostgreSQL's tools on some systems
have_postgresql() { command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
have_chromium() { [ -x /usr/bin/chromium ] || command -v chromium >/dev/null; }

# need PACKAGE WHAT: install the Debian package unless have_PACKAGE finds it.
need() {
  "have_$1" && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tests: installing $1 (apt-get install -y $1) for $2"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
  else
    echo "tests: $1 is missing, and $2 needs it; install it (Debian/Ubuntu: sudo apt-get install -y $1), then re-run make test" >&2
    exit 1
  fi
}
need postgresql "the multi-machine tests' database server (initdb, pg_ctl)"
need chromium "the browser tests' headless browser"

# As root, PostgreSQL runs as the postgres user (it refuses root); Debian's package creates that user.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "tests: creating the system user postgres, which PostgreSQL runs as when the tests run as root"
  useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi
