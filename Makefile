# Two commands do everything on a machine that has only Python: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint fuzz bench soak chaos clean venv install

$(STAMP): requirements.txt requirements-dev.txt setup.cfg setup.py app/render/_ssimulacra2.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

test: $(STAMP)
	bash scripts/install-test-packages.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fuzz: $(STAMP)
	FUZZ_EXAMPLES=20000 FUZZ_DEADLINE_S=600 $(BIN)/python -m pytest tests/unit/test_fuzz_render.py -q

bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || apt-get install -y -q wrk >/dev/null 2>&1 || echo "wrk is missing and could not be installed: the wrk hit rows are skipped"
	$(BIN)/python -m bench.run $(BENCH_ARGS)

soak: $(STAMP)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

chaos: $(STAMP)
	bash scripts/install-test-packages.sh
	$(BIN)/python -m bench.chaos $(CHAOS_ARGS)

# Production install (docs/deployment.md), run as root: runtime dependencies only
# (requirements.txt and the package itself, built as a wheel, not editable; no test tools)
# into $(PREFIX)/venv, plus gunicorn.conf.py and wsgi.py beside it. Everything is owned by
# root and not writable by anyone else, so the service user can read and run the code but
# never change it. Run it again for an upgrade, then `systemctl reload image-proxy`.
PREFIX ?= /opt/image-proxy

install:
	@test "$$(id -u)" = 0 || { echo "make install: run as root (the service user must not own its code)" >&2; exit 1; }
	umask 022; test -x $(PREFIX)/venv/bin/python || $(PYTHON) -m venv $(PREFIX)/venv
	umask 022; $(PREFIX)/venv/bin/pip install -q --no-cache-dir -r requirements.txt
	umask 022; $(PREFIX)/venv/bin/pip install -q --no-cache-dir --no-deps --force-reinstall .
	install -m 0644 -o root -g root gunicorn.conf.py wsgi.py $(PREFIX)/
	chown -R root:root $(PREFIX)
	chmod -R go-w $(PREFIX)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis test-artifacts
