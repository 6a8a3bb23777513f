# tcptunnel — everything a developer or CI needs, from a fresh machine with python3 and make.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
export PYTHONPATH := $(CURDIR)
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: all venv run test lint fuzz bench clean

all: test

# The venv: created once, refreshed when the dependency files change.
# Debian's python3 needs python3-venv for ensurepip; install it when we may.
$(PY):
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  echo "python3 -m venv failed; installing Debian's python3-venv"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q python3-venv || (apt-get update -q && apt-get install -y -q python3-venv)) >/dev/null; \
	  else echo "run: sudo apt-get install python3-venv" >&2; exit 1; fi; \
	  $(PYTHON) -m venv $(VENV); }

$(STAMP): $(PY) setup.cfg pyproject.toml constraints.txt
	$(PY) -m pip install -q --upgrade pip
	# twistd finds twisted/plugins/tcptunnel_plugin.py through this folder on sys.path: a .pth
	# file of ours puts it there (setuptools' 'compat' editable mode did, and is going away).
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -c "import site, sys; open(site.getsitepackages()[0] + '/tcptunnel-checkout.pth', 'w').write(sys.argv[1] + '\\n')" "$(CURDIR)"
	@touch $@

venv: $(STAMP)

run: $(STAMP)
	@echo "Starting the loopback demo (conf/demo.xml): Gateway, Proxy-Client and Proxy-Server in one process."
	@echo "A test web server answers on 127.0.0.1:18080; the tunnel entrance is 127.0.0.1:18022."
	@echo "Status page: http://127.0.0.1:18090/  (metrics: /metrics, JSON: /status)"
	@echo ""
	@echo "    Try, in another terminal:   curl http://127.0.0.1:18022/"
	@echo ""
	@echo "Press Ctrl+C to stop."
	@$(PY) -m http.server 18080 --bind 127.0.0.1 --directory docs >/dev/null 2>&1 & web=$$!; \
	  trap 'kill $$web 2>/dev/null' EXIT INT TERM; \
	  $(VENV)/bin/twistd -n --pidfile= tcptunnel --config conf/demo.xml

# Real third-party programs the tests drive, as "command:Debian package" (or "/path:package"
# for a file that is no command, checked to exist): headless Chromium for
# the status page; tinyproxy and microsocks as outbound proxies; dig (against a dnsmasq the
# test runs itself: dnsmasq-base, the program without Debian's system service), socat and
# iperf3 through UDP Bindings; nginx as the reverse proxy in front of a WebSocket Listener
# (its service disabled after install, as tinyproxy's); curl, ssh with nc -X 5 (netcat-openbsd)
# through SOCKS5 Bindings to a throw-away sshd, and nginx and haproxy as targets reading PROXY
# headers (issue 17); nginx's stream module (a file of libnginx-mod-stream) and haproxy as the
# SNI balancers in front of Gateway processes (issue 20).  The services these packages start
# are stopped and disabled when this installed them, never otherwise.  Installed when missing
# and we may (as root, with apt-get); each test says clearly that it could not run otherwise.
# (Non-interactive: iperf3's package asks whether to start a daemon.)
TEST_PROGRAMS := chromium:chromium tinyproxy:tinyproxy microsocks:microsocks \
	dig:bind9-dnsutils dnsmasq:dnsmasq-base socat:socat iperf3:iperf3 nginx:nginx \
	curl:curl ssh:openssh-client sshd:openssh-server nc.openbsd:netcat-openbsd haproxy:haproxy \
	/usr/lib/nginx/modules/ngx_stream_module.so:libnginx-mod-stream

test: $(STAMP)
	@missing=""; for entry in $(TEST_PROGRAMS); do name=$${entry%%:*}; \
	  case $$name in /*) [ -e $$name ];; \
	    *) command -v $$name >/dev/null || [ -x /usr/sbin/$$name ];; esac || \
	    missing="$$missing $${entry#*:}"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's$$missing for the tests"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  (apt-get install -y -q $$missing || (apt-get update -q && apt-get install -y -q $$missing)) \
	    >/dev/null 2>&1 || echo "could not install$$missing: the tests that need them say so"; \
	  for pair in tinyproxy:tinyproxy nginx:nginx haproxy:haproxy ssh:openssh-server; do \
	    case " $$missing " in *" $${pair#*:} "*) \
	      systemctl disable --now $${pair%%:*} >/dev/null 2>&1 || true;; esac; done; \
	fi
	@rm -rf _trial_temp
	@set -o pipefail 2>/dev/null; $(VENV)/bin/trial --jobs=2 tcptunnel 2>&1 | tee .trial-output.txt; \
	  status=$${PIPESTATUS[0]}; $(PY) .ci/trial-summary .trial-output.txt; exit $$status
SHELL := /bin/bash

lint: $(STAMP)
	$(VENV)/bin/ruff check tcptunnel twisted bench
	$(VENV)/bin/mypy tcptunnel twisted/plugins bench

fuzz: $(STAMP)
	TCPTUNNEL_FUZZ_EXAMPLES=20000 $(VENV)/bin/trial tcptunnel.test.test_fuzz tcptunnel.test.test_relay.HostileRelayTests

# Debian's openssh, socat and iperf3 are what the benchmark compares against and drives.
bench: $(STAMP)
	@for tool in sshd socat iperf3; do \
	  command -v $$tool >/dev/null || [ -x /usr/sbin/$$tool ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q openssh-server openssh-client socat iperf3 || \
	     (apt-get update -q && apt-get install -y -q openssh-server openssh-client socat iperf3)) >/dev/null; \
	  else sudo apt-get install -y openssh-server openssh-client socat iperf3; fi; fi
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) bench/mux_bench.py --json bench-mux.json >/dev/null && echo "mux micro-benchmark: bench-mux.json"
	@# .opt-2.pyc files for the PYTHONOPTIMIZE=2 run, as the install instructions make them
	$(PY) -OO -m compileall -q $(VENV)/lib tcptunnel twisted/plugins >/dev/null || true
	$(PY) bench/run.py

# Not part of `make bench` (~11 minutes with end-to-end and UDP, issues 16 and 18): each is a
# separate target.
# One Gateway with SESSIONS sessions (2 links each) from one load-generator process: RSS per
# link, idle CPU, a reconnect storm, one stream among idle sessions (~3 minutes for 1,000).
# SESSIONS_ARGS=--nat: the unauthenticated-link limits a deployment behind one NAT needs.
SESSIONS ?= 1000
.PHONY: bench-sessions bench-hops
bench-sessions: $(STAMP)
	$(PY) bench/sessions.py --sessions $(SESSIONS) $(SESSIONS_ARGS) --json bench/out/sessions.json

# Where one round trip's CPU goes per hop, TLS and plain links (strace, perf, cProfile; ~3 min).
bench-hops: $(STAMP)
	@for tool in strace perf; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q strace linux-perf || \
	     (apt-get update -q && apt-get install -y -q strace linux-perf)) >/dev/null; \
	  else sudo apt-get install -y strace linux-perf; fi; fi
	$(PY) bench/hops.py --json bench/out/hops.json

# Total throughput of 8 sessions over 2 Gateway processes behind HAProxy against 1 Gateway,
# direct and behind HAProxy, round-robin in one run (issue 20, docs/scaling.md; ~1 minute).
.PHONY: bench-scaleout
bench-scaleout: $(STAMP)
	@for tool in haproxy iperf3; do command -v $$tool >/dev/null || [ -x /usr/sbin/$$tool ] || \
	  missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing || \
	     (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing)) >/dev/null; \
	    systemctl disable --now haproxy >/dev/null 2>&1 || true; \
	  else sudo apt-get install -y $$missing; fi; fi
	$(PY) bench/scaleout.py --json bench/out/scaleout.json

clean:
	rm -rf $(VENV) _trial_temp* .trial-output.txt twisted/plugins/dropin.cache .mypy_cache .ruff_cache .hypothesis *.egg-info
