#!/bin/sh
# Native install on a Jetson (JetPack 6) from a built container image's venv
# or a local checkout: creates the user, folders, units and udev rule.
#   sudo deploy/jetson/install.sh
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
id lineinspect >/dev/null 2>&1 || useradd --system --home /var/lib/lineinspect \
    --shell /usr/sbin/nologin --groups video lineinspect
install -d -o lineinspect -g lineinspect -m 0750 /var/lib/lineinspect
install -d -m 0755 /etc/lineinspect
[ -f /etc/lineinspect/config.yaml ] || install -m 0644 "$HERE/config.example.yaml" /etc/lineinspect/config.yaml
install -m 0644 "$HERE/lineinspect.service" "$HERE/lineinspect-uplink.service" \
    "$HERE/lineinspect-engine.service" /etc/systemd/system/
install -m 0644 "$HERE/99-lineinspect-camera.rules" /etc/udev/rules.d/
udevadm control --reload && udevadm trigger --subsystem-match=video4linux
systemctl daemon-reload
systemctl enable lineinspect-engine.service lineinspect.service lineinspect-uplink.service
echo "installed; edit /etc/lineinspect/config.yaml, then: systemctl start lineinspect"
