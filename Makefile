# mercli — `make test` and `make run` set up everything they need on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# libsndfile1-dev: Debian's dcmtk.pc requires sndfile, so pkg-config fails without it.
# orthanc-dicomweb: the STOW-RS peer; openssh-server: the SFTP peer (tests start their own sshd);
# dicom3tools: dciodvfy, DICOM's own validator, checks de-identified output.
# slurm-wlm, munge: the one-node Slurm cluster the tests start (tests/slurmkit.py) for runner = "slurm".
# rsync: tests/test_watch.py copies into a drop folder with it, as sites do.
# prometheus: the server (and promtool) that tests/test_prometheus.py runs the example alerts and
# dashboard queries on; the tests start their own (on a host with systemd the package's own
# service also starts, on :9090: `systemctl disable --now prometheus` if unwanted).
DEB_PACKAGES := dcmtk libdcmtk-dev libsndfile1-dev orthanc orthanc-dicomweb openssh-server dicom3tools slurm-wlm munge g++ pkg-config rsync prometheus
CXXFLAGS ?= -O2 -std=c++17 -Wall -Wextra
CSRC := $(wildcard csrc/*.cpp)
BINARIES := $(patsubst csrc/%.cpp,build/%,$(CSRC))
# Debian's DCMTK leaves Nagle on unless told otherwise; every DCMTK process we start inherits this.
export TCP_NODELAY := 1

.PHONY: all setup system-packages build lint test bench run soak clean

all: build

setup: system-packages $(VENV)/.installed

# Installs the Debian packages that are missing, when we are root; otherwise says what is missing.
system-packages:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "missing Debian packages:$$missing (run 'sudo make setup' or install them)" >&2; exit 1; \
	  fi; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

build: $(BINARIES)
	@test ! -x $(PY) || $(PY) -m compileall -q mercli  # bytecode, as an installed package has it

# A binary is csrc/NAME.cpp plus its parts in csrc/NAME/, if any (getdcmtags has some).
.SECONDEXPANSION:
build/%: csrc/%.cpp $$(wildcard csrc/$$*/*.cpp csrc/$$*/*.h)
	@mkdir -p build
	@pkg-config --exists dcmtk || { pkg-config --print-errors dcmtk; echo "run 'make setup' (as root) first" >&2; exit 1; }
	$(CXX) $(CXXFLAGS) -o $@ $< $(wildcard csrc/$*/*.cpp) $$(pkg-config --cflags --libs dcmtk)

lint: setup
	$(VENV)/bin/ruff check mercli tests benchmarks
	$(VENV)/bin/ruff format --check mercli tests benchmarks
	$(VENV)/bin/mypy mercli

test: setup build lint
	$(VENV)/bin/pytest -q

bench: setup build
	$(PY) -m benchmarks

# The embedded default: receive on 11112 as MERCLI, route by examples/rules.toml (everything
# ends up in ./received/), dispatch, purge hourly. Ctrl-C stops it cleanly.
RUN_PORT ?= 11112
run: setup build
	@echo
	@echo "mercli is starting: receive on port $(RUN_PORT) as AE MERCLI, spool in ./spool"
	@echo "send images with:  TCP_NODELAY=1 storescu -aec MERCLI localhost $(RUN_PORT) FILE.dcm ..."
	@echo "                   (or: TCP_NODELAY=1 storescu -aec MERCLI +sd +r localhost $(RUN_PORT) DIR)"
	@echo "they land in:      ./received/<job id>/   (rules: examples/rules.toml)"
	@echo "watch it with:     $(PY) -m mercli status --spool spool     Ctrl-C stops it."
	@echo
	$(PY) -m mercli run --rules examples/rules.toml --spool spool --port $(RUN_PORT) --aet MERCLI

# Crash soak (not part of `make test`): kill -9 route and dispatch at random for SECONDS
# seconds (default 300) while storescu streams series, then check nothing acknowledged was
# lost. SEED=n replays a run (the seed is printed); counts are printed at the end.
SOAK_SECONDS = $(or $(SECONDS),300)
soak: setup build
	MERCLI_SOAK_SECONDS=$(SOAK_SECONDS) $(if $(SEED),MERCLI_SOAK_SEED=$(SEED)) \
	  $(VENV)/bin/pytest -q -s -p no:cacheprovider --timeout=$$(( $(SOAK_SECONDS) + 900 )) \
	  tests/reliability/test_crash_anywhere.py

clean:
	rm -rf build $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
