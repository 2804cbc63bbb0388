#!/usr/bin/env bash
# System packages the tests need beyond Python's: PostgreSQL's initdb and pg_ctl, for the real database
# server of the multi-machine tests, and Chromium, the browser Playwright drives in the browser tests.
# Installed with apt-get when run as root, else asked for.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # useradd, and PostgreSQL's tools on some systems
have_postgres() { command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
if ! have_postgres; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tests: installing PostgreSQL (apt-get install -y postgresql) for the multi-machine tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "tests: PostgreSQL's initdb and pg_ctl are missing; install PostgreSQL (Debian/Ubuntu: sudo apt-get install -y postgresql), then re-run make test" >&2
    exit 1
  fi
fi
have_chromium() { [ -x /usr/bin/chromium ] || command -v chromium >/dev/null; }
if ! have_chromium; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tests: installing Chromium (apt-get install -y chromium) for the browser tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "tests: Chromium is missing; install it (Debian/Ubuntu: sudo apt-get install -y chromium), then re-run make test" >&2
    exit 1
  fi
fi
# As root, PostgreSQL runs as the postgres user (it refuses root); Debian's package creates that user.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "tests: creating the system user postgres, which PostgreSQL runs as when the tests run as root"
  useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi
