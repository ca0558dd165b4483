"""Create the credentials of a FedDST deployment: TLS certificates (a self-signed CA and a
SuperLink certificate signed by it, with subject alternative names for loopback and any hosts
given) and SuperNode key pairs for Flower's SuperNode authentication.

    python deploy/certs.py OUT_DIR [--host NAME_OR_IP ...]
    python deploy/certs.py OUT_DIR --node-key NAME

The first writes OUT_DIR/ca.crt (give it to every SuperNode and to `flwr`), OUT_DIR/server.pem
and OUT_DIR/server.key (the SuperLink's); the second OUT_DIR/NAME (the SuperNode's private key,
for `flower-supernode --auth-supernode-private-key`) and OUT_DIR/NAME.pub (to enrol with
`flwr supernode register`). Good for development and trials; in production use your
organisation's PKI.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("127.0.0.1", "localhost")
VALIDITY = datetime.timedelta(days=365)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_certificates(out_dir: Path, hosts: tuple[str, ...] = ()) -> dict[str, Path]:
    """Write ca.crt, server.pem and server.key to out_dir; returns their paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("feddst-flwr CA")).issuer_name(_name("feddst-flwr CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    names = list(dict.fromkeys((*LOOPBACK, *hosts)))
    server = (
        x509.CertificateBuilder().subject_name(_name(names[-1])).issuer_name(ca.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"ca": out_dir / "ca.crt", "cert": out_dir / "server.pem", "key": out_dir / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(_pem_key(server_key))
    paths["key"].chmod(0o600)
    return paths


def create_node_key(path: Path) -> tuple[Path, Path]:
    """An EC (P-384) key pair in OpenSSH format, as Flower's SuperNode authentication reads
    it: the private key at `path` (mode 600), the public key at `path`.pub."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    public = path.with_name(path.name + ".pub")
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return path, public


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--host", action="append", default=[], help="extra SAN: the SuperLink's DNS name or IP")
    parser.add_argument("--node-key", help="write a SuperNode key pair OUT_DIR/NAME, OUT_DIR/NAME.pub instead")
    args = parser.parse_args()
    if args.node_key:
        private, public = create_node_key(args.out_dir / args.node_key)
        print(f"private key: {private}\npublic key: {public}")
        return
    for role, path in create_certificates(args.out_dir, tuple(args.host)).items():
        print(f"{role}: {path}")


if __name__ == "__main__":
    main()
