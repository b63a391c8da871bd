"""C2PA Content Credentials: a signed manifest inside every image, read back by any C2PA reader.

Signing uses ``c2pa-python`` (the Content Authenticity Initiative's SDK): the manifest's
``c2pa.created`` action says ``trainedAlgorithmicMedia`` (EU AI Act Art. 50(2)), the hard binding
is a hash of the file's bytes, and the signature is ES256 under the deployment's certificate
chain. The chain comes from settings (a file path or the PEM itself), one per deployment and
optionally one per team; ``instabatch credentials init`` writes an untrusted development chain
(docs/compliance.md, "Content Credentials").
"""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.settings import Settings

log = logging.getLogger(__name__)

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
LEDGER_ASSERTION = "com.instabatch.ledger"
MIME_TYPES = {"PNG": "image/png", "WEBP": "image/webp", "JPEG": "image/jpeg"}
DEV_FOLDER = "credentials"
KEY_FILE, CHAIN_FILE, ROOT_FILE = "signing-key.pem", "signing-chain.pem", "dev-root.pem"
DEV_ORGANIZATION = "InstaBatch development (UNTRUSTED)"
# No thumbnail in the manifest: it would add kilobytes per image and say nothing the pixels do not.
# No read-back after each signature (c2pa's verify_after_sign): it was 0.56 of the 0.94 ms a 64² PNG's
# signature took (docs/performance.md); each identity is checked once instead, when loaded (check_signing).
SIGN_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}, "verify": {"verify_after_sign": False}}


class CredentialsError(RuntimeError):
    """No usable signing key: raised when a worker starts, never per item."""


@dataclass(frozen=True)
class SigningIdentity:
    key_pem: bytes
    chain_pem: bytes
    signer: str  # the leaf certificate's subject, as readers show it
    development: bool
    source: str
    tsa_url: str | None = None


# -- keys and chains ---------------------------------------------------------------------


def read_pem(value: str) -> bytes:
    """``value`` is the PEM itself (from the environment) or the path of a file holding it."""
    if "-----BEGIN" in value:
        return value.encode()
    path = Path(value).expanduser()
    if not path.is_file():
        raise CredentialsError(f"{path} does not exist or is not a file")
    return path.read_bytes()


def identity_from(key: str, chain: str, *, source: str, tsa_url: str | None = None) -> SigningIdentity:
    """A signing identity from a key and a chain (PEM or paths); the key must match the leaf."""
    try:
        key_pem, chain_pem = read_pem(key), read_pem(chain)
    except CredentialsError as exc:
        raise CredentialsError(f"{source}: {exc}") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError as exc:
        raise CredentialsError(f"{source}: unreadable key or certificate chain ({exc})") from None
    if private.public_key().public_numbers() != leaf.public_key().public_numbers():
        raise CredentialsError(f"{source}: the private key does not match the chain's first certificate")
    organization = _attribute(leaf.subject, NameOID.ORGANIZATION_NAME)
    return SigningIdentity(key_pem, chain_pem, signer=leaf.subject.rfc4514_string(),
                           development=organization == DEV_ORGANIZATION, source=source, tsa_url=tsa_url)


def dev_chain_folder(settings: Settings) -> Path:
    return settings.var_dir.resolve() / DEV_FOLDER


def create_dev_chain(folder: Path) -> bool:
    """Write a self-signed ES256 root and a signing certificate under ``folder``; False when one is
    there already. Atomic: concurrent workers on one var folder end up with the same chain."""
    if (folder / KEY_FILE).is_file():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".credentials-", dir=folder.parent))
    root_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _certificate(_name("InstaBatch development root"), root_key, root_key, None, authority=True)
    leaf = _certificate(_name("InstaBatch development signer"), leaf_key, root_key, root, authority=False)
    pem = serialization.Encoding.PEM
    (staging / ROOT_FILE).write_bytes(root.public_bytes(pem))
    (staging / CHAIN_FILE).write_bytes(leaf.public_bytes(pem) + root.public_bytes(pem))
    (staging / KEY_FILE).write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    os.chmod(staging / KEY_FILE, 0o600)
    try:
        staging.rename(folder)
    except OSError:  # another process made it first: keep theirs
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
        return False
    return True


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEV_ORGANIZATION)])


def _certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey,
                 issuer: x509.Certificate | None, *, authority: bool) -> x509.Certificate:
    """A root (``authority``) or a C2PA signing leaf: digitalSignature, EKU emailProtection, AKI/SKI."""
    now = dt.datetime.now(dt.timezone.utc)
    usage = dict(digital_signature=not authority, content_commitment=False, key_encipherment=False,
                 data_encipherment=False, key_agreement=False, key_cert_sign=authority, crl_sign=authority,
                 encipher_only=False, decipher_only=False)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=authority, path_length=0 if authority else None), critical=True)
               .add_extension(x509.KeyUsage(**usage), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if not authority:
        builder = (builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def _attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    found = name.get_attributes_for_oid(oid)
    return str(found[0].value) if found else None


# -- the deployment's signers ------------------------------------------------------------


@dataclass
class Signers:
    """The deployment's signing identity and the teams' own, loaded once per worker process."""

    default: SigningIdentity
    team_folder: Path | None = None
    _teams: dict[str, SigningIdentity] = field(default_factory=dict)

    def for_team(self, team: str | None) -> SigningIdentity:
        """The team's chain when ``C2PA_TEAM_KEYS_DIR/<team>/`` holds one, else the deployment's."""
        if not team or self.team_folder is None:
            return self.default
        if team not in self._teams:
            folder = self.team_folder / team
            self._teams[team] = (check_signing(identity_from(str(folder / KEY_FILE), str(folder / CHAIN_FILE),
                                                             source=f"team {team}", tsa_url=self.default.tsa_url))
                                 if (folder / KEY_FILE).is_file() else self.default)
        return self._teams[team]


def load_signers(settings: Settings) -> Signers:
    """The signing identity the settings name; in ``dev`` mode without one, the development chain
    under ``var/credentials`` (made on first use). Raises ``CredentialsError`` saying what to set."""
    tsa = settings.c2pa_tsa_url or None
    if settings.c2pa_signing_key or settings.c2pa_signing_chain:
        if not (settings.c2pa_signing_key and settings.c2pa_signing_chain):
            raise CredentialsError("set both C2PA_SIGNING_KEY and C2PA_SIGNING_CHAIN (a path or the PEM itself)")
        default = identity_from(settings.c2pa_signing_key, settings.c2pa_signing_chain,
                                source="C2PA_SIGNING_KEY / C2PA_SIGNING_CHAIN", tsa_url=tsa)
    elif settings.credentials_mode == "required":
        raise CredentialsError(
            "INSTABATCH_CREDENTIALS=required but no signing key is configured: set C2PA_SIGNING_KEY and "
            "C2PA_SIGNING_CHAIN (a file path or the PEM itself), or run `instabatch credentials init` for an "
            "untrusted development chain and point them at it")
    else:
        folder = dev_chain_folder(settings)
        if create_dev_chain(folder):
            log.warning("created an UNTRUSTED development signing chain in %s", folder)
        default = identity_from(str(folder / KEY_FILE), str(folder / CHAIN_FILE),
                                source=f"development chain {folder}", tsa_url=tsa)
    if default.development:
        log.warning("signing Content Credentials with an UNTRUSTED development chain (%s)", default.source)
    team_folder = settings.c2pa_team_keys_dir
    if team_folder is not None and not team_folder.is_dir():
        raise CredentialsError(f"C2PA_TEAM_KEYS_DIR {team_folder} is not a folder")
    return Signers(check_signing(default), team_folder)


def check_signing(identity: SigningIdentity) -> SigningIdentity:
    """``identity``, once it has signed a small PNG that a C2PA reader then finds valid: signatures are not
    read back one by one (SIGN_SETTINGS), so a key that does not match its chain is caught here."""
    from PIL import Image

    probe = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(probe, "PNG")
    manifest = manifest_for(title="signing check", software="InstaBatch", version="check", created={},
                            refined=None, ledger={})
    try:
        report = read_manifest(sign(probe.getvalue(), "image/png", manifest, identity))
    except Exception as error:  # c2pa's own errors name the problem (bad key, bad chain)
        raise CredentialsError(f"cannot sign with {identity.source}: {error}") from error
    if not report.present or report.state == "Invalid":
        raise CredentialsError(f"a signature by {identity.source} does not verify: "
                               f"{report.error or '; '.join(report.failures) or report.state}")
    return identity


# -- signing -----------------------------------------------------------------------------


def manifest_for(*, title: str, software: str, version: str, created: dict[str, Any],
                 refined: dict[str, Any] | None, ledger: dict[str, Any]) -> dict[str, Any]:
    """The manifest: ``c2pa.created`` (trainedAlgorithmicMedia, the model), the refine step as a
    further action where it ran, and the link back to the ledger."""
    agent = {"name": software, "version": version}
    actions = [{"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": agent, "parameters": created}]
    if refined:
        actions.append({"action": "c2pa.edited", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                        "softwareAgent": agent, "parameters": refined})
    # No c2pa.watermarked action: C2PA requires it to name a registered soft-binding algorithm, and
    # imwatermark's is not one; the ledger assertion records the watermark instead.
    return {
        "claim_generator_info": [agent], "title": title,
        "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}},
                       {"label": LEDGER_ASSERTION, "data": ledger}],
    }


_signing = threading.local()  # per thread: the c2pa signer of each identity, and the signing context


def _signer_and_context(identity: SigningIdentity) -> tuple[Any, Any]:
    """Built once per thread and identity, not per image: parsing the key and chain and building
    the context cost 0.5 ms of the 2 to 3 ms a signature takes (docs/performance.md)."""
    import c2pa

    signers = _signing.__dict__.setdefault("signers", {})
    if identity not in signers:
        info = c2pa.C2paSignerInfo(alg=b"es256", sign_cert=identity.chain_pem, private_key=identity.key_pem,
                                   ta_url=identity.tsa_url.encode() if identity.tsa_url else None)
        signers[identity] = c2pa.Signer.from_info(info)
    if getattr(_signing, "context", None) is None:
        _signing.context = c2pa.Context.from_dict(SIGN_SETTINGS)
    return signers[identity], _signing.context


def sign(data: bytes, mime_type: str, manifest: dict[str, Any], identity: SigningIdentity) -> bytes:
    """``data`` (PNG, WebP or JPEG bytes) with the signed manifest embedded; pixels unchanged."""
    import c2pa

    signer, context = _signer_and_context(identity)
    with c2pa.Builder(manifest, context) as builder:
        signed = io.BytesIO()
        builder.sign(signer, mime_type, io.BytesIO(data), signed)
        return signed.getvalue()


# -- reading -----------------------------------------------------------------------------


@dataclass
class ManifestReport:
    """What a C2PA reader says about a file's manifest."""

    present: bool
    state: str | None = None  # Valid, Trusted or Invalid (c2pa's validation_state)
    signer: str | None = None
    issuer: str | None = None
    trusted: bool = False
    ai_generated: bool = False
    ledger: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.present and self.state in ("Valid", "Trusted")

    def as_dict(self) -> dict[str, Any]:
        return {"present": self.present, "state": self.state, "valid": self.valid, "signer": self.signer,
                "issuer": self.issuer, "trusted": self.trusted, "ai_generated": self.ai_generated,
                "ledger": self.ledger, "failures": self.failures, "error": self.error}


def read_manifest(data: bytes, trust_anchors: bytes | None = None) -> ManifestReport:
    """Read and validate the manifest: its hash binding, its signature, and its signer against
    ``trust_anchors`` (PEM) when given. A file without a manifest reports ``present=False``."""
    import c2pa

    mime_type = sniff_mime_type(data)
    if mime_type is None:
        return ManifestReport(present=False, error="not a PNG, WebP or JPEG file")
    try:
        with _reader_context(trust_anchors) as context:
            reader = c2pa.Reader.try_create(mime_type, io.BytesIO(data), None, context)
            if reader is None:
                return ManifestReport(present=False)
            with reader:
                return _report(json.loads(reader.json()), reader.get_validation_state())
    except c2pa.C2paError as exc:
        return ManifestReport(present=True, state="Invalid", error=str(exc))


@lru_cache(maxsize=8)
def _context_settings(trust_anchors: bytes | None) -> str:
    verify = {"verify": {"verify_trust": bool(trust_anchors)}}
    trust = {"trust": {"trust_anchors": trust_anchors.decode()}} if trust_anchors else {}
    return json.dumps({**verify, **trust})


def _reader_context(trust_anchors: bytes | None):
    import c2pa

    return c2pa.Context.from_json(_context_settings(trust_anchors))


def _report(store: dict[str, Any], state: str | None) -> ManifestReport:
    manifest = store.get("manifests", {}).get(store.get("active_manifest") or "", {})
    signature = manifest.get("signature_info") or {}
    assertions = manifest.get("assertions", [])
    actions = [action for assertion in assertions if assertion.get("label", "").startswith("c2pa.actions")
               for action in assertion.get("data", {}).get("actions", [])]
    ledger = next((assertion.get("data", {}) for assertion in assertions
                   if assertion.get("label") == LEDGER_ASSERTION), {})
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    failures = [entry.get("code", "") for entry in results.get("failure", [])]
    trusted = any(entry.get("code") == "signingCredential.trusted" for entry in results.get("success", []))
    return ManifestReport(
        present=True, state=state, signer=signature.get("common_name") or signature.get("issuer"),
        issuer=signature.get("issuer"), trusted=trusted and state == "Trusted",
        ai_generated=any(action.get("digitalSourceType") == TRAINED_ALGORITHMIC_MEDIA for action in actions),
        ledger=ledger, failures=[code for code in failures if code],
    )


def sniff_mime_type(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return None
