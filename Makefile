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
JS_DIR := clients/js
CHROMIUM ?= /usr/bin/chromium
REDIS_PORT ?= 6390
WORKERS ?= 2

.PHONY: install run run-redis test test-compiled test-fallback bench bench-quick bench-peers lint clean system-deps test-js js-build bench-js

install: $(STAMP)

$(STAMP): pyproject.toml setup.py proto/seqactor/v1/seqactor.proto src/seqactor/_delta.pyx src/seqactor/_readindex.pyx src/seqactor/_wire.h src/seqactor/_wire.pxd
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel "cython>=3.0,<4" "grpcio-tools>=1.60,<2"
	$(PIP) install -q --no-build-isolation -e '.[dev]'
	$(PY) -c "import seqactor._delta, seqactor._readindex, seqactor._proto.seqactor_pb2" \
	  || (echo "error: compiled kernel or generated protobuf module missing" >&2; exit 1)
	touch $(STAMP)

# redis-server is needed by the multi-node tests; install it from Debian when missing.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || { echo "error: redis-server missing and apt-get install failed" >&2; exit 1; }; }
	@# the JS SDK's browser tests drive Debian's chromium (never a downloaded browser build)
	@test -x $(CHROMIUM) || { \
	  echo "installing chromium (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || { echo "error: chromium missing and apt-get install failed" >&2; exit 1; }; }
	@command -v npm >/dev/null 2>&1 || { echo "error: Node.js 20+ with npm is needed for clients/js" >&2; exit 1; }

run: install
	mkdir -p var
	@echo "get a token in another terminal:"
	@echo "  $(VENV)/bin/seqactor token --secret-file $(SECRET) --user alice"
	@echo "  $(VENV)/bin/seqactor token --secret-file $(SECRET) --user backend --role service"
	$(VENV)/bin/seqactor serve --host $(HOST) --port $(PORT) --store $(STORE) --secret-file $(SECRET)

# A local Redis (AOF on, data in var/redis, left running) and WORKERS server processes on one
# port sharing it (`seqactor serve --workers`). Stop Redis: redis-cli -p $(REDIS_PORT) shutdown
run-redis: install system-deps
	mkdir -p var/redis
	redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1 || redis-server --port $(REDIS_PORT) \
	  --bind 127.0.0.1 --dir $(CURDIR)/var/redis --appendonly yes --save "" --daemonize yes \
	  --logfile $(CURDIR)/var/redis/redis.log
	@echo "get a token in another terminal:"
	@echo "  $(VENV)/bin/seqactor token --secret-file $(SECRET) --user alice"
	$(VENV)/bin/seqactor serve --workers $(WORKERS) --host $(HOST) --port $(PORT) \
	  --store redis://127.0.0.1:$(REDIS_PORT)/0 --secret-file $(SECRET)

test: install system-deps test-js test-compiled test-fallback

test-compiled: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fallback: install
	SEQACTOR_NO_EXTENSIONS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# The peer servers the benchmarks compare with (Bun, Node + ws): npm, from the committed lock.
bench-peers: bench/peers/node_modules/.installed

bench/peers/node_modules/.installed: bench/peers/package.json bench/peers/package-lock.json
	cd bench/peers && npm ci --no-audit --no-fund
	touch $@


# The TypeScript SDK (clients/js): npm ci, generate from the .proto, compile, bundle; then the
# Node tests (real `seqactor serve`) and the Chromium tests (the demo page).
$(JS_DIR)/node_modules/.package-lock.json: $(JS_DIR)/package-lock.json
	cd $(JS_DIR) && npm ci --no-audit --no-fund --loglevel=error

js-build: $(JS_DIR)/node_modules/.package-lock.json
	cd $(JS_DIR) && npm run --silent build

test-js: install system-deps js-build
	cd $(JS_DIR) && SEQACTOR_BIN=$(CURDIR)/$(VENV)/bin/seqactor CHROMIUM_BIN=$(CHROMIUM) npm run --silent test:node
	cd $(JS_DIR) && SEQACTOR_BIN=$(CURDIR)/$(VENV)/bin/seqactor CHROMIUM_BIN=$(CHROMIUM) npm run --silent test:browser

bench-js: install system-deps js-build
	SEQACTOR_BIN=$(CURDIR)/$(VENV)/bin/seqactor CHROMIUM_BIN=$(CHROMIUM) node bench/js_client.mjs


bench: install system-deps bench-peers bench-js
	for b in bench/[a-z]*.py; do $(PY) $$b || exit 1; done

bench-quick: install system-deps bench-peers
	for b in bench/[a-z]*.py; do $(PY) $$b --quick || exit 1; done

# mypy types the compiled kernels from their stubs (src/seqactor/_delta.pyi, _readindex.pyi);
# stubtest checks those stubs against the built modules.
lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src
	$(PY) -m mypy.stubtest seqactor._delta seqactor._readindex --allowlist tests/stubtest-allowlist.txt

clean:
	rm -rf build src/*.egg-info src/seqactor/_delta.c src/seqactor/_delta*.so src/seqactor/_readindex.c src/seqactor/_readindex*.so src/seqactor/_proto/seqactor_pb2.py* $(STAMP)
