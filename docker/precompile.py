"""Image build step: byte-compile what nbdbackup's commands import, once, into the image.

Role: the runtime stage writes no bytecode (``PYTHONDONTWRITEBYTECODE=1``, and the venv
belongs to root while the commands run as uid 10809), so a module without a ``.pyc`` in
the image is compiled again by every command that imports it: ~0.16 s of CPU more for
an S3 client (boto3 and botocore) on each ``agent backup`` or ``restore``. Compiling all
of site-packages instead adds ~17 MB (numpy's and others' modules no command imports).

Run by the Dockerfile's builder stage with the venv's interpreter, after the venv is
trimmed: imports every module of the ``nbdbackup`` package (every command's code),
builds an S3 client (botocore imports much of itself lazily, at client creation) and
a TLS context, then writes an unchecked-hash ``.pyc`` (valid whatever the files' mtimes
in the final image: its sources never change) for every venv module that is loaded.

Invariant: prints one line, the number of modules compiled; fails (non-zero) on any
import or compile error, so a broken image never builds.
"""

import importlib
import pkgutil
import py_compile
import ssl
import sys

import nbdbackup

VENV = sys.prefix + "/"

for info in pkgutil.walk_packages(nbdbackup.__path__, "nbdbackup."):
    importlib.import_module(info.name)

import boto3  # noqa: E402

boto3.client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
             aws_access_key_id="k", aws_secret_access_key="s")
ssl.create_default_context()

n = 0
for mod in list(sys.modules.values()):
    path = getattr(mod, "__file__", None) or ""
    if path.startswith(VENV) and path.endswith(".py"):
        py_compile.compile(path, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        n += 1
print(f"precompile: {n} modules byte-compiled")
