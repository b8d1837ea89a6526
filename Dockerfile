# nbdbackup in a container: the same Debian packages and set-up as scripts/setup.
#
#   docker build -t nbdbackup .
#   docker run --rm nbdbackup --help
#   docker compose -f docker/compose.yaml up      (serves a demo image; see that file)
#
# The Debian package list below must match DEB_PACKAGES in scripts/setup
# (tests/unit/test_container_files.py checks it).
FROM debian:12-slim

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends \
        python3 \
        qemu-utils \
        qemu-system-common \
        nbdkit \
        nbdkit-plugin-python \
        libnbd-bin \
        python3-libnbd \
        python3-venv \
        openssl \
        systemd \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/nbdbackup
COPY . /opt/nbdbackup
# scripts/setup finds every package installed above, so it only builds .venv
# (Debian's python3 with --system-site-packages, for libnbd's `nbd` module).
RUN bash scripts/setup && rm -rf /root/.cache/pip

ENV PATH=/opt/nbdbackup/.venv/bin:$PATH
# Sockets and images live in volumes (see docker/compose.yaml).
VOLUME ["/data", "/run/nbdbackup"]
ENTRYPOINT ["nbdbackup"]
CMD ["--help"]
