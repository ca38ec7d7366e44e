#!/usr/bin/env bash
# Gradescope runs this once, when it builds the autograder's image (the zip is unpacked in /autograder/source).
# It installs the course like a student would (CPU torch: Gradescope has no GPUs, so speed is not graded there)
# and creates the unprivileged user the test processes run as.
set -euo pipefail
cd /autograder/source
apt-get update -q && apt-get install -y -q python3 python3-pip python3-venv
python3 -m venv /autograder/venv
/autograder/venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
/autograder/venv/bin/pip install -q -e .
id -u student >/dev/null 2>&1 || useradd --no-create-home --shell /usr/sbin/nologin student
chmod -R a+rX /autograder/source /autograder/venv
chmod 600 /autograder/source/seed_secret.txt 2>/dev/null || true
