"""Make the TLS and SuperNode-authentication material for a deployment.

Writes into ``--out`` (default ``deploy/certs``)::

    ca.crt, ca.key                    a private certificate authority
    superlink.crt, superlink.key      the SuperLink's TLS certificate, signed by the CA, with
                                      subjectAltNames localhost, 127.0.0.1 and every --host
    supernodes/<site>.key             each hospital's SuperNode authentication key (EC P-384,
                                      OpenSSH private key format: flower-supernode
                                      --auth-supernode-private-key)
    supernodes/<site>.pub             its public key (OpenSSH format: the coordinator registers
                                      it with `flwr supernode register <site>.pub <superlink>`)

Flower 1.42 authenticates SuperNodes by public keys registered at the SuperLink
(``flower-superlink --enable-supernode-auth``, which requires TLS); a SuperNode whose
key was never registered is refused. Only the CA certificate and a site's own key pair
are needed at a hospital; the CA key stays with the coordinator.

Existing files are kept (re-running adds missing sites), unless ``--force``.

    python scripts/deploy/make_certs.py --out deploy/certs \\
        --sites hospital_a hospital_b hospital_c --host superlink
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data``; a private key is created 0600 (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not private:
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create (or load) the CA in ``out``."""
    crt_path, key_path = out / "ca.crt", out / "ca.key"
    if crt_path.is_file() and key_path.is_file():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            sys.exit(f"{key_path}: expected an EC private key")
        return x509.load_pem_x509_certificate(crt_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-imaging deployment CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert, key


def make_server_cert(
    out: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str]
) -> None:
    """The SuperLink's certificate for ``hosts`` (plus localhost and 127.0.0.1)."""
    names = list(dict.fromkeys(["localhost", "127.0.0.1", *hosts]))
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "superlink.key", _pem_key(key), private=True)
    _write(out / "superlink.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_supernode_keys(out: Path, site: str) -> None:
    """Site ``site``'s SuperNode authentication key pair (EC P-384, OpenSSH formats)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(out / "supernodes" / f"{site}.key", private, private=True)
    _write(out / "supernodes" / f"{site}.pub", public + f" {site}\n".encode(), private=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("deploy/certs"))
    parser.add_argument("--sites", nargs="*", default=[], help="hospital names to make keys for")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra DNS name or IP of the SuperLink in its certificate (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    out: Path = args.out
    if args.force:
        for path in [*out.glob("*.crt"), *out.glob("*.key"), *out.glob("supernodes/*")]:
            path.unlink()
    ca, ca_key = make_ca(out)
    server = out / "superlink.crt"
    if server.is_file():
        cert = x509.load_pem_x509_certificate(server.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = {str(v) for v in sans.get_values_for_type(x509.DNSName)} | {
            str(v) for v in sans.get_values_for_type(x509.IPAddress)
        }
        if not set(args.host) <= have:
            make_server_cert(out, ca, ca_key, sorted(have | set(args.host)))
    else:
        make_server_cert(out, ca, ca_key, args.host)
    for site in args.sites:
        if not (out / "supernodes" / f"{site}.key").is_file():
            make_supernode_keys(out, site)
    print(f"certificates and keys in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
