#!/usr/bin/env bash
# Build (once, cached outside the repo) slsDetectorPackage's virtual Jungfrau/Eiger servers and slsReceiver
# from the sdist of the installed slsdet. Cache: ${STD_DAQ_SLS_CACHE:-$HOME/.cache/std-daq/sls}/<version>/bin
# Needs cmake, make, gcc, g++ (Debian: apt-get install -y cmake make gcc g++). Extra args: --force, -j N.
# PYTHON selects the interpreter that has this project and slsdet installed (default: python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" -m daq_backend.control.sls_build "$@"
