#!/usr/bin/env bash
# Installs the Debian packages q3vl builds with, only those that are missing (needs root or sudo).
# GoogleTest and Google Benchmark are listed too so a bare Debian 12 machine gets everything; hdf5-tools gives the
# h5ls/h5dump that io/shard_format.md uses to look into shards, python3-matplotlib draws runs' metrics
# (jobs/plot_metrics.py, with Debian's /usr/bin/python3; its CTest plot_metrics_demo).
set -euo pipefail

packages=(cmake make g++ ccache libeigen3-dev libyaml-cpp-dev libhdf5-dev libopenmpi-dev openmpi-bin
          nlohmann-json3-dev libpcre2-dev libicu-dev libjpeg62-turbo-dev libpng-dev libwebp-dev
          libavformat-dev libavcodec-dev libswscale-dev libavutil-dev pkg-config libgtest-dev libbenchmark-dev
          hdf5-tools python3-matplotlib libcli11-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all build dependencies present"
fi
