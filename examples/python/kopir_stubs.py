"""Generates Python stubs from the repository's proto/ at run time.

The stubs go to a temporary directory (removed at exit) with the compiler
bundled in grpcio-tools; no system protoc is needed.
"""

import atexit
import importlib
import os
import shutil
import sys
import tempfile

PROTO_ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "proto"))


def load(*protos):
    """Compiles `protos` (paths under proto/) and returns their modules as
    (messages, services) pairs, in order."""
    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix="kopir-stubs-")
    atexit.register(shutil.rmtree, out, True)
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + list(protos)) != 0:
        sys.exit(f"could not compile {', '.join(protos)} from {PROTO_ROOT}")
    sys.path.insert(0, out)
    modules = []
    for p in protos:
        name = p[: -len(".proto")].replace("/", ".")
        modules.append((importlib.import_module(name + "_pb2"), importlib.import_module(name + "_pb2_grpc")))
    return modules


def read(path):
    with open(path, "rb") as f:
        return f.read()


def channel(addr, ca, cert=None, key=None):
    """A TLS channel to `addr` trusting `ca`, presenting cert/key if given."""
    import grpc

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(ca),
        private_key=read(key) if key else None,
        certificate_chain=read(cert) if cert else None,
    )
    return grpc.secure_channel(addr, creds)


def refusal(err):
    """The gRPC code and the kopir-error reason of a refused call."""
    trailers = dict(err.trailing_metadata() or ())
    return err.code().name, trailers.get("kopir-error", "-"), err.details()


def request_id(call):
    """The kopir-request-id the server echoed on a call's answer."""
    for md in (call.initial_metadata() or (), call.trailing_metadata() or ()):
        for k, v in md:
            if k == "kopir-request-id":
                return v
    return "-"
