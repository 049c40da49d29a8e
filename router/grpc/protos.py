"""The Python stubs of tei.proto (`pb`: messages, `services`: servicers and client stubs).

The stubs are generated from the .proto, never written by hand nor committed: tei_pb2.py,
tei_pb2_grpc.py and tei_pb2.pyi are made next to tei.proto (git ignores them) by grpcio-tools'
protoc when missing or when the .proto, protobuf or grpcio-tools changed since (a sha256 stamp,
not file times, which installers do not keep). So a checkout, the test suite and the server
all build them on first import, and nothing can go stale. Why files rather than grpc's
in-memory `protos_and_services`: that one finds the .proto through sys.path, which editable
installs (an import hook) do not extend, and the files give editors and type checkers the .pyi.

`python -m router.grpc.protos` generates them ahead of time: run it when installing somewhere
the package directory is read-only at run time (a container image), so the server only imports.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO = PACKAGE_DIR / "tei.proto"
GENERATED = ("tei_pb2.py", "tei_pb2_grpc.py", "tei_pb2.pyi")
# protoc names the descriptor after the .proto's path below its include root. With the package
# directory as that root, the descriptor is `tei.proto` as in TEI, so reflection clients asking
# for the file by name (`file_by_filename("tei.proto")`) find it; the price is that the service
# module imports the message module as a top-level `tei_pb2`, rewritten to the package's.
FLAT_IMPORT = "import tei_pb2 as tei__pb2"
PACKAGE_IMPORT = "from router.grpc import tei_pb2 as tei__pb2"
STAMP = PACKAGE_DIR / "tei_pb2.sha256"


# Part of the stamp: changing how the stubs are generated makes existing ones stale too.
GENERATION = b"include-root: package directory"


def _generator_versions() -> bytes:
    """The protobuf runtime and the grpcio-tools the stubs are (or would be) made with: stubs
    from a newer generator than the runtime refuse to import ("gencode/runtime version"), so a
    protobuf downgraded (or grpcio-tools changed) after generation makes them stale."""
    versions = []
    for name in ("protobuf", "grpcio-tools"):
        try:
            versions.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} absent")
    return " ".join(versions).encode()


def _proto_hash() -> str:
    return hashlib.sha256(PROTO.read_bytes() + GENERATION + _generator_versions()).hexdigest()


def stubs_fresh() -> bool:
    return (STAMP.is_file() and STAMP.read_text().strip() == _proto_hash()
            and all((PACKAGE_DIR / name).is_file() for name in GENERATED))


def generate() -> None:
    """Run protoc (in a child process: importing grpc_tools.protoc here would install its
    import hooks in the server) into a scratch directory, then move the files in place, so a
    second process generating at the same time never sees half-written modules."""
    wanted = _proto_hash()
    scratch = Path(tempfile.mkdtemp(prefix=".protoc-", dir=PACKAGE_DIR))
    try:
        command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PACKAGE_DIR}",
                   f"--python_out={scratch}", f"--pyi_out={scratch}",
                   f"--grpc_python_out={scratch}", str(PROTO)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"protoc failed on {PROTO}:\n{result.stderr}")
        services = scratch / "tei_pb2_grpc.py"
        code = services.read_text()
        if FLAT_IMPORT not in code:
            raise RuntimeError(f"protoc's {services.name} no longer has `{FLAT_IMPORT}`")
        services.write_text(code.replace(FLAT_IMPORT, PACKAGE_IMPORT))
        for name in GENERATED:
            os.replace(scratch / name, PACKAGE_DIR / name)
        stamp = scratch / STAMP.name
        stamp.write_text(wanted + "\n")
        os.replace(stamp, STAMP)  # last: the stamp vouches for the files before it
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def ensure_stubs() -> None:
    if stubs_fresh():
        return
    if importlib.util.find_spec("grpc_tools") is None:
        raise ImportError(
            f"the gRPC stubs are not generated yet and grpcio-tools is missing: install "
            f"embedserve[grpc] (or run `python -m router.grpc.protos` where it is installed) "
            f"to generate them from {PROTO}")
    try:
        generate()
    except PermissionError as exc:
        raise ImportError(
            f"cannot write the gRPC stubs next to {PROTO} ({exc}): run "
            "`python -m router.grpc.protos` once as the user that installed embedserve"
        ) from exc


if TYPE_CHECKING:  # the type checker reads the generated modules (and tei_pb2.pyi) directly
    from router.grpc import tei_pb2 as pb
    from router.grpc import tei_pb2_grpc as services
else:
    ensure_stubs()
    pb = importlib.import_module("router.grpc.tei_pb2")
    services = importlib.import_module("router.grpc.tei_pb2_grpc")

if __name__ == "__main__":
    print(f"gRPC stubs of {PROTO} are up to date in {PACKAGE_DIR}")
