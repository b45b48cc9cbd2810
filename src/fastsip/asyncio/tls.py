"""TLS contexts for SIP over TLS (RFC 3261 §26.2, RFC 5630): the server context for ``tls:``
listeners and the client context for the TLS connections we open, built from PEM files.

Kept in the shell because only :mod:`fastsip.asyncio` imports :mod:`ssl`.  Both contexts allow
TLS 1.2 and 1.3 only and keep Python's default cipher list (forward-secret AEAD suites, no RC4,
3DES, SHA-1 MACs or anonymous suites).  A bad file raises :class:`TLSConfigError`, naming the
file and what is wrong with it in words an operator can act on, never OpenSSL's "PEM lib".

::

    server = server_context("server.pem")                     # chain and key in one file
    server = server_context("chain.pem", "key.pem", ca="clients-ca.pem", verify_client=True)
    client = client_context()                                 # the system trust store
    client = client_context("private-ca.pem")                 # only that CA
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from fastsip.errors import FastSIPError

__all__ = ["TLSConfigError", "client_context", "server_context"]

_CERT_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)
_KEY_BEGIN = re.compile(rb"-----BEGIN ((?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY)-----")


class TLSConfigError(FastSIPError, ValueError):
    """A certificate, key or CA file that cannot be used.  ``role`` is ``"cert"``, ``"key"``
    or ``"ca"`` (which option or argument it came from), ``path`` the file, ``problem`` what is
    wrong; ``str()`` is ``"PATH: PROBLEM"``."""

    def __init__(self, role: str, path: str, problem: str) -> None:
        self.role = role
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def _read(role: str, path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(role, str(path), f"cannot read it: {exc.strerror or exc}") from None


def _refuse_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal of a server that may have none.
    raise TLSConfigError("key", "", "the private key is encrypted")


def _check_certificates(role: str, path: str, pem: bytes, what: str) -> list[bytes]:
    """The PEM certificate blocks of ``pem``; each must parse (an X.509 certificate)."""
    blocks = _CERT_BLOCK.findall(pem)
    if not blocks:
        raise TLSConfigError(role, path, f"no PEM {what} in it "
                                         "(expected -----BEGIN CERTIFICATE-----)")
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for n, block in enumerate(blocks, 1):
        try:
            scratch.load_verify_locations(cadata=block.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            where = f"certificate {n} of {len(blocks)}" if len(blocks) > 1 else "the certificate"
            raise TLSConfigError(role, path, f"{where} is not valid PEM/X.509 "
                                             f"({exc.reason or exc})") from None
    return blocks


def _ca_pem(ca: str | Path) -> str:
    """The CA certificates of the bundle ``ca``, checked, as PEM text for ``cadata``."""
    path = str(ca)
    blocks = _check_certificates("ca", path, _read("ca", path), "CA certificate")
    return b"\n".join(blocks).decode("ascii")


def _load_chain(ctx: ssl.SSLContext, cert: str | Path, key: str | Path | None) -> None:
    """Our certificate chain and its private key (``key`` None: in the ``cert`` file)."""
    cert_path = str(cert)
    key_path = str(key) if key is not None else cert_path
    _check_certificates("cert", cert_path, _read("cert", cert_path), "certificate")
    key_role = "key" if key is not None else "cert"
    key_pem = _read(key_role, key_path)
    found = _KEY_BEGIN.search(key_pem)
    if found is None:
        raise TLSConfigError(key_role, key_path, "no PEM private key in it (expected "
                                                 "-----BEGIN PRIVATE KEY-----)"
                             + ("; give the key file with --tls-key" if key is None else ""))
    if found.group(1) == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in key_pem:
        raise TLSConfigError(key_role, key_path,
                             "the private key is encrypted; a server cannot ask for its "
                             "passphrase (decrypt it: openssl pkey -in KEY -out KEY.plain)")
    try:
        ctx.load_cert_chain(cert_path, key_path, password=_refuse_passphrase)
    except TLSConfigError:
        raise TLSConfigError(key_role, key_path, "the private key is encrypted") from None
    except OSError as exc:            # ssl.SSLError is an OSError too, checked first
        if isinstance(exc, ssl.SSLError):
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise TLSConfigError(key_role, key_path,
                                     f"the private key does not match the certificate in "
                                     f"{cert_path}") from None
            raise TLSConfigError(key_role, key_path,
                                 f"the private key is not valid PEM ({exc.reason or exc})"
                                 ) from None
        raise TLSConfigError(key_role, key_path, f"cannot read it: {exc.strerror or exc}"
                             ) from None


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    # TLS 1.0/1.1 are deprecated (RFC 8996); SIP over TLS asks for nothing older than 1.2.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION     # CRIME; the default already, said out loud
    return ctx


def server_context(cert: str | Path, key: str | Path | None = None, ca: str | Path | None = None,
                   verify_client: bool = False) -> ssl.SSLContext:
    """The context of ``tls:`` listeners: our chain from ``cert`` (PEM, leaf first), the key
    from ``key`` (default: in the ``cert`` file).  ``verify_client``: a client must present a
    certificate that chains to a CA in ``ca`` (required then), or the handshake fails."""
    if verify_client and ca is None:
        raise TLSConfigError("ca", "", "verifying client certificates needs a CA bundle")
    # With a CA bundle, only it: a client certificate from any public CA must not pass.
    ctx = _harden(ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cadata=_ca_pem(ca) if ca is not None else None))
    _load_chain(ctx, cert, key)
    if verify_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str | Path | None = None, verify: bool = True, *,
                   cert: str | Path | None = None,
                   key: str | Path | None = None) -> ssl.SSLContext:
    """The context for TLS connections we open: the server's chain must lead to a CA in ``ca``
    (default: the system trust store) and name the host we connect to (a DNS name, checked
    against its dNSName SANs and sent as SNI; an IP literal, checked against its iPAddress
    SANs, and no SNI: RFC 6066 §3).  ``verify=False`` checks nothing: for labs only.  With
    ``cert``, we present that chain to servers that ask for a client certificate."""
    # With a CA bundle, only it: a private PKI must not also trust every public CA.
    ctx = _harden(ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cadata=_ca_pem(ca) if ca is not None else None))
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        _load_chain(ctx, cert, key)
    return ctx
