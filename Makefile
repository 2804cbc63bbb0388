# The README's two commands: `make study` (set up, then run the default study) and `make test`
# (set up, then run the tests). Both create or reuse the virtual environment .venv in the repository.
VENV := .venv
PYTHON ?= python3
STUDY ?=
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup study lint test test-fast ui tune server server-stop dashboard app

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# `make study STUDY=large` first makes studies/large.yaml the active params.yaml (FORCE=1: over unsaved edits).
# JOBS=N runs the study's independent stages N at a time (vaebench repro --jobs; default: cores / threads).
JOBS ?=
study: setup
	@if [ -n "$(STUDY)" ]; then vaebench use-study $(STUDY) $(if $(FORCE),--force); fi
	vaebench check
	vaebench repro $(if $(JOBS),--jobs $(JOBS))

# ruff, pinned in constraints.txt and configured in pyproject.toml; `make test` (CI's command) runs it first.
lint: setup
	ruff check .
	ruff format --check .

test: setup lint
	bash tests/system_packages.sh
	pytest

# The fast tier: no slow, system-package or browser test (pyproject.toml's markers): no root, no system
# package, at most 90 s on 2 cores.
test-fast: setup
	pytest -m "not slow and not system and not browser"

# `make tune` adds studies/tune/default.yaml to params.yaml's tune: block, then runs (or resumes) stage tune@default.
TUNE ?= default
tune: setup
	vaebench enable-tune studies/tune/$(TUNE).yaml
	dvc repro tune@$(TUNE)

# The MLflow UI on the study's local store, bound to loopback only.
ui: setup
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# A shared MLflow tracking server on PostgreSQL (a private cluster under .vaebench/server unless POSTGRES=URL),
# on loopback unless HOST=0.0.0.0; clients set MLFLOW_TRACKING_URI=http://HOST:PORT. Beyond loopback it asks
# for a login (admin's in .vaebench/server/credentials); AUTH=1 also on loopback, NO_AUTH=1 never. See README
# "Past one machine".
HOST ?= 127.0.0.1
PORT ?= 5000
POSTGRES ?=
AUTH ?=
NO_AUTH ?=
server: setup
	vaebench server start --host $(HOST) --port $(PORT) $(if $(POSTGRES),--postgres $(POSTGRES)) \
		$(if $(AUTH),--auth) $(if $(NO_AUTH),--no-auth)

server-stop: setup
	vaebench server stop

# optuna-dashboard on the tuning storage (VAEBENCH_OPTUNA_STORAGE, else the local optuna.db), loopback only.
OPTUNA_STORAGE ?= $(or $(VAEBENCH_OPTUNA_STORAGE),sqlite:///$(CURDIR)/optuna.db)
dashboard: setup
	@if [ "$(OPTUNA_STORAGE)" = "sqlite:///$(CURDIR)/optuna.db" ] && [ ! -s optuna.db ]; then \
		echo "no tuning study yet: optuna.db is missing; run make tune first, or set VAEBENCH_OPTUNA_STORAGE" >&2; exit 1; fi
	optuna-dashboard $(OPTUNA_STORAGE) --host 127.0.0.1 --port 8080

# The app (pipeline/app/main.py): study browser, latent explorer, train then generate; loopback only.
APP_PORT ?= 8501
app: setup
	streamlit run pipeline/app/main.py --server.address 127.0.0.1 --server.port $(APP_PORT) \
		--server.headless true --browser.gatherUsageStats false
