"""Telephone numbers and asserted identities for routing code.

- :func:`normalize_e164`: an E.164 number (``+`` and digits) from a dialled number, a ``tel:``
  URI or a ``sip:...;user=phone`` URI -- visual separators removed (RFC 3966 §5.1.1:
  ``-``, ``.``, ``(``, ``)``, and spaces people type), ``+`` kept, ``00`` (an international
  prefix) turned into ``+``, and a national number (``national_prefix``, e.g. the UK's
  ``0``) given ``+`` and ``country_code``.
- RFC 3325's trust boundary for P-Asserted-Identity (PAI): :func:`strip_untrusted_identity`
  (a request from outside the trust domain brings no identity we believe),
  :func:`assert_preferred_identity` (an authenticated user's P-Preferred-Identity becomes
  our PAI) and :func:`withhold_identity` (``Privacy: id``: the PAI does not leave the trust
  domain).  The :class:`~fastsip.app.Router` applies them by default.
"""

from __future__ import annotations

from fastsip.errors import FastSIPError
from fastsip.sip import URI, Request

__all__ = [
    "NumberError",
    "assert_preferred_identity",
    "normalize_e164",
    "privacy_id",
    "strip_untrusted_identity",
    "withhold_identity",
]

PAI = "P-Asserted-Identity"
PPI = "P-Preferred-Identity"
#: RFC 3966 visual separators, and the space and slash people type in numbers.
_SEPARATORS = str.maketrans("", "", "-.() /\t")


class NumberError(FastSIPError, ValueError):
    """Not a telephone number (the message says why)."""


def _number_part(value: str | URI) -> str:
    """The number in a dialled string, a tel: URI or a SIP URI's user part (parameters of a
    tel: URI such as ``;phone-context`` and a SIP user's own ``;`` parameters dropped)."""
    if isinstance(value, URI):
        if value.scheme.lower() == "tel":
            return value.host.split(";", 1)[0] if value.user is None else value.user
        if value.user is None:
            raise NumberError(f"{value}: no user part (no number)")
        return value.user.split(";", 1)[0]
    text = value.strip()
    lower = text.lower()
    if lower.startswith("tel:"):
        return text[4:].split(";", 1)[0]
    if lower.startswith(("sip:", "sips:")):
        return _number_part(URI(text))
    return text


def normalize_e164(value: str | URI, country_code: str | None = None,
                   national_prefix: str | None = None, *,
                   international_prefix: str = "00") -> str:
    """``+`` and digits, or :class:`NumberError`.

    ``normalize_e164("tel:+44-20-7946-0000")`` → ``"+442079460000"``;
    ``normalize_e164("020 7946 0000", country_code="44", national_prefix="0")`` → the same;
    ``normalize_e164("sip:0044(20)79460000@gw;user=phone")`` → the same.  A number that is
    neither international (``+``, ``international_prefix``) nor national (with the rule
    given) is not an E.164 number: NumberError (a short code, an extension)."""
    number = _number_part(value).translate(_SEPARATORS)
    if number.startswith("+"):
        digits = number[1:]
    elif international_prefix and number.startswith(international_prefix):
        digits = number[len(international_prefix):]
    elif country_code and national_prefix and number.startswith(national_prefix):
        digits = country_code.lstrip("+") + number[len(national_prefix):]
    else:
        raise NumberError(f"{value}: not an international number and no national rule "
                          "matches (country_code, national_prefix)")
    if not digits.isdigit() or not digits.isascii():
        raise NumberError(f"{value}: not a telephone number (only digits after +)")
    if not 3 <= len(digits) <= 15:                 # E.164: at most 15 digits
        raise NumberError(f"{value}: {len(digits)} digits is not an E.164 number")
    return "+" + digits


def privacy_id(request: Request) -> bool:
    """Does the request ask for its identity to be withheld (RFC 3323 ``Privacy: id``, or
    ``critical`` with it)?"""
    for value in request.headers.getall("Privacy"):
        for token in value.replace(",", ";").split(";"):
            if token.strip().lower() == "id":
                return True
    return False


def strip_untrusted_identity(request: Request, source_trusted: bool) -> bool:
    """RFC 3325 §5: a PAI is believed only from a node of the trust domain; from anyone else
    it is removed.  Returns True when one was removed."""
    if source_trusted or PAI not in request.headers:
        return False
    request.remove_header(PAI)
    return True


def assert_preferred_identity(request: Request, user: str | None) -> bool:
    """RFC 3325 §6: for an authenticated ``user``, a P-Preferred-Identity naming that user
    becomes the PAI (and the PPI goes: it was a hint to us, not for the next hop).  A PPI
    naming someone else is removed and asserts nothing.  Returns True when a PAI was added."""
    if user is None or PPI not in request.headers:
        return False
    preferred = request.headers.getall(PPI)
    request.remove_header(PPI)
    if PAI in request.headers:
        return False
    added = False
    for value in preferred:
        text = value.strip()
        inner = text[text.find("<") + 1:text.rfind(">")] if "<" in text else text
        try:
            uri = URI(inner)
        except ValueError:
            continue
        if uri.user is not None and uri.user.split(";", 1)[0] == user:
            request.add_header(PAI, text)
            added = True
    return added


def withhold_identity(request: Request, next_hop_trusted: bool) -> bool:
    """RFC 3325 §7: with ``Privacy: id`` the PAI is not passed to a node outside the trust
    domain.  Returns True when one was removed."""
    if next_hop_trusted or PAI not in request.headers or not privacy_id(request):
        return False
    request.remove_header(PAI)
    return True
