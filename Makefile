# seqactor — every target works on a fresh machine (Python 3.11+, a C compiler, Debian apt).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8765
STORE  ?= sqlite:///var/seqactor.db
SECRET ?= var/secret
PYTEST_ARGS ?=

.PHONY: install run test test-compiled test-fallback bench bench-quick bench-peers lint clean system-deps

install: $(STAMP)

$(STAMP): pyproject.toml setup.py proto/seqactor/v1/seqactor.proto src/seqactor/_delta.pyx
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=69" wheel "cython>=3.0,<4" "grpcio-tools>=1.60,<2"
	$(PIP) install -q --no-build-isolation -e '.[dev]'
	$(PY) -c "import seqactor._delta, seqactor._proto.seqactor_pb2" \
	  || (echo "error: compiled kernel or generated protobuf module missing" >&2; exit 1)
	touch $(STAMP)

# redis-server is needed by the multi-node tests; install it from Debian when missing.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || { echo "error: redis-server missing and apt-get install failed" >&2; exit 1; }; }

run: install
	mkdir -p var
	@echo "get a token in another terminal:"
	@echo "  $(VENV)/bin/seqactor token --secret-file $(SECRET) --user alice"
	@echo "  $(VENV)/bin/seqactor token --secret-file $(SECRET) --user backend --role service"
	$(VENV)/bin/seqactor serve --host $(HOST) --port $(PORT) --store $(STORE) --secret-file $(SECRET)

test: install system-deps test-compiled test-fallback

test-compiled: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fallback: install
	SEQACTOR_NO_EXTENSIONS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# The peer servers the benchmarks compare with (Bun, Node + ws): npm, from the committed lock.
bench-peers: bench/peers/node_modules/.installed

bench/peers/node_modules/.installed: bench/peers/package.json bench/peers/package-lock.json
	cd bench/peers && npm ci --no-audit --no-fund
	touch $@

bench: install system-deps bench-peers
	for b in bench/[a-z]*.py; do $(PY) $$b || exit 1; done

bench-quick: install system-deps bench-peers
	for b in bench/[a-z]*.py; do $(PY) $$b --quick || exit 1; done

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src

clean:
	rm -rf build src/*.egg-info src/seqactor/_delta.c src/seqactor/_delta*.so src/seqactor/_proto/seqactor_pb2.py* $(STAMP)
