"""A throwaway PKI for TLS tests, made with the ``openssl`` command line: a CA, a server cert and client certs.

The server cert names ``localhost`` and ``127.0.0.1``; each client cert has the hostname as its CN and as its only
SAN DNS name, which is how the aggregator learns a client's host identity. Keys are P-256 (fast to make).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DAYS = "2"


@dataclass(frozen=True)
class ClientCert:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, ClientCert] = field(default_factory=dict)


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _new_key_and_csr(directory: Path, name: str, subject: str) -> None:
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
        cwd=directory,
    )  # fmt: skip


def _sign(directory: Path, name: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", DAYS, "-sha256", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


def make_pki(directory: Path, hostnames: list[str] | tuple[str, ...] = ()) -> Pki:
    """Create ``ca.crt``, ``server.crt`` and ``<hostname>.crt`` (with their keys) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", DAYS, "-subj", "/CN=wattmeter test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _new_key_and_csr(directory, "server", "/CN=localhost")
    _sign(
        directory,
        "server",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n",
    )
    clients = {}
    for hostname in hostnames:
        _new_key_and_csr(directory, hostname, f"/CN={hostname}")
        _sign(
            directory,
            hostname,
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
            f"subjectAltName=DNS:{hostname}\n",
        )
        clients[hostname] = ClientCert(directory / f"{hostname}.crt", directory / f"{hostname}.key")
    return Pki(
        directory=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        clients=clients,
    )
