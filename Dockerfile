# nbdbackup in a container: the server, the pull agent and the repository
# tools; nothing the tests need (no pytest, qemu, nbdkit, libnbd).
#
#   docker build -t nbdbackup .
#   docker run --rm nbdbackup --help
#   docker-compose -f docker/compose.yaml up -d     (or: docker compose ...)
#
# Two stages on the same base, so the virtualenv's python symlink
# (/usr/bin/python3) is valid in both:
# - builder: python3-venv and ca-certificates; builds /opt/nbdbackup/.venv
#   from the project's runtime dependencies (pyproject.toml), pinned by
#   requirements.txt used as a constraints file (test-only pins there are
#   never installed), and installs the project itself (not editable).
# - runtime: python3 and that venv, nothing else.  The runtime imports only
#   blake3, numpy, zstandard, cryptography, (optionally) uvloop and, for s3:// repositories, boto3; it never runs qemu-img, nbdkit or
#   libnbd (zstandard's unused CFFI backend, 12 MB, is removed: its C one is used;
#   so are botocore's models of every AWS service but S3 and the STS/SSO ones its
#   credential providers use, 27 MB: nbdbackup only makes S3 clients; and numpy's
#   own test suites, 17 MB).  What the commands import is then byte-compiled
#   once (docker/precompile.py: unchecked-hash .pyc), since the runtime writes
#   no bytecode (PYTHONDONTWRITEBYTECODE, a venv owned by root): without them
#   every command compiled what it imported, ~0.16 s of CPU more for an S3
#   client (boto3/botocore) on each `agent backup`/`restore`.
#   Restoring with plugins/restore.py needs nbdkit and is done on a
#   host (or an image of your own) with the checkout.
#
# BASE_IMAGE: any Debian 12 image (tests/containers/conftest.py passes the
# one it made with debootstrap when no registry is reachable).
ARG BASE_IMAGE=debian:12-slim

FROM ${BASE_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/nbdbackup/.venv
WORKDIR /src
# Dependencies first: this layer is reused while only the sources change.
COPY requirements.txt pyproject.toml ./
RUN /opt/nbdbackup/.venv/bin/pip install -q -c requirements.txt blake3 numpy uvloop boto3 zstandard cryptography
COPY nbdbackup ./nbdbackup
RUN /opt/nbdbackup/.venv/bin/pip install -q --no-deps -c requirements.txt . \
 && /opt/nbdbackup/.venv/bin/python -c 'import blake3, numpy, uvloop, boto3, zstandard, cryptography, nbdbackup.cli' \
 && /opt/nbdbackup/.venv/bin/python -m pip uninstall -q -y pip setuptools \
 && rm -f /opt/nbdbackup/.venv/lib/python3*/site-packages/zstandard/_cffi.*.so \
 && for d in /opt/nbdbackup/.venv/lib/python3*/site-packages/botocore/data/*/; do \
        case "$(basename "$d")" in s3|sts|sso|sso-oidc) ;; *) rm -rf "$d" ;; esac; \
    done \
 && find /opt/nbdbackup/.venv/lib/python3*/site-packages/numpy -type d -name tests -prune -exec rm -rf {} + \
 && find /opt/nbdbackup/.venv -name __pycache__ -prune -exec rm -rf {} +
# Byte-compile what the commands import (the runtime writes no bytecode): docker/precompile.py.
COPY docker/precompile.py /tmp/precompile.py
RUN /opt/nbdbackup/.venv/bin/python /tmp/precompile.py && rm /tmp/precompile.py

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/nbdbackup/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    NBDBACKUP_CONTROL=/run/nbdbackup/control.sock \
    NBDBACKUP_HEALTH_URI=nbd+unix:///?socket=/run/nbdbackup/nbd.sock
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && groupadd --system --gid 10809 nbdbackup \
 && useradd --system --uid 10809 --gid 10809 --home-dir /var/lib/nbdbackup --create-home \
        --shell /usr/sbin/nologin nbdbackup \
 && install -d -o nbdbackup -g 0 -m 0775 /data /run/nbdbackup /backup \
 && chgrp 0 /var/lib/nbdbackup && chmod 0775 /var/lib/nbdbackup
COPY --from=builder /opt/nbdbackup/.venv /opt/nbdbackup/.venv

# State directories: owner nbdbackup, group 0, group-writable, so an
# arbitrary uid in group 0 (OpenShift's random uid, docker run --user
# 12345:0) can use them and volumes made from them; README "Containers".
# Non-root by default.  Serving a block device: docker run --device /dev/sdX
# --group-add disk (or --user 0); see README "Containers".
USER 10809:10809
WORKDIR /var/lib/nbdbackup
# Images and state in /data, sockets in /run/nbdbackup, pulled backups in /backup.
VOLUME ["/data", "/run/nbdbackup", "/backup"]
# Healthy = the server answers an NBD handshake on its socket and lists its
# exports (our own client; no extra packages).  Set NBDBACKUP_HEALTH_URI when
# the socket is elsewhere; a container running another command (pull, repo)
# reports unhealthy, so compose disables the check for those.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD nbdbackup info --list "$NBDBACKUP_HEALTH_URI" >/dev/null || exit 1
# Exec form: nbdbackup is PID 1 and gets docker stop's SIGTERM itself
# (serve finishes in-flight requests, flushes, removes its sockets, exits 0).
ENTRYPOINT ["nbdbackup"]
CMD ["--help"]
