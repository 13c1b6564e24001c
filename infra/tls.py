"""TLS material for the local broker's SASL_SSL test listener (JDK keytool), kept apart from the
broker's lifecycle in ``infra/localkafka.py``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from core.errors import FatalError


def make_tls_material(directory: Path, password: str) -> tuple[Path, Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost (JDK keytool): the broker's PKCS12 keystore
    and truststore, and the certificate in PEM for Python clients. Idempotent."""
    directory.mkdir(parents=True, exist_ok=True)
    keystore, truststore, pem = directory / "broker.p12", directory / "trust.p12", directory / "ca.pem"
    if keystore.exists() and truststore.exists() and pem.exists():
        return keystore, truststore, pem
    for path in (keystore, truststore, pem):
        path.unlink(missing_ok=True)
    keytool = shutil.which("keytool")
    if keytool is None:
        raise FatalError("keytool (from the JDK) is needed to create TLS material")

    def run(*args: str) -> None:
        result = subprocess.run([keytool, *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise FatalError(f"keytool {args[0]} failed: {result.stderr or result.stdout}")

    run("-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048", "-validity", "3650",
        "-dname", "CN=localhost", "-ext", "SAN=ip:127.0.0.1,dns:localhost", "-storetype", "PKCS12",
        "-keystore", str(keystore), "-storepass", password, "-keypass", password)
    run("-exportcert", "-rfc", "-alias", "broker", "-keystore", str(keystore), "-storepass", password,
        "-file", str(pem))
    run("-importcert", "-noprompt", "-alias", "broker", "-file", str(pem), "-storetype", "PKCS12",
        "-keystore", str(truststore), "-storepass", password)
    return keystore, truststore, pem
