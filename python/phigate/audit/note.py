"""C2SP signed notes and tlog-checkpoint bodies: format, parse, sign and verify checkpoints."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from phigate.audit.keys import SignerKey, VerifierKey
from phigate.errors import PhigateError

__all__ = [
    "Checkpoint",
    "NoteError",
    "Signature",
    "SignedNote",
    "format_checkpoint",
    "parse_checkpoint",
    "parse_note",
    "sign_note",
    "verify_note",
]

_DASH = "\u2014 "  # every signature line starts with an em dash and a space
_MAX_SIGNATURES = 100  # C2SP: verifiers may reject notes with more


class NoteError(PhigateError):
    """A note or checkpoint that is malformed or not signed by a trusted key."""


@dataclass(frozen=True)
class Checkpoint:
    """A tlog-checkpoint body: origin, tree size, root hash and optional extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    @property
    def body(self) -> str:
        return format_checkpoint(self.origin, self.size, self.root, self.extensions)


@dataclass(frozen=True)
class Signature:
    name: str
    key_hash: int
    signature: bytes  # without the 4-byte key hash


@dataclass(frozen=True)
class SignedNote:
    body: str  # the signed text, ending in "\n"
    signatures: tuple[Signature, ...]


def format_checkpoint(origin: str, size: int, root: bytes, extensions: Sequence[str] = ()) -> str:
    lines = [origin, str(size), base64.b64encode(root).decode(), *extensions]
    return "".join(line + "\n" for line in lines)


def parse_checkpoint(body: str) -> Checkpoint:
    """The checkpoint a note body holds (three lines at least; extension lines non-empty)."""
    if not body.endswith("\n"):
        raise NoteError("the checkpoint body does not end with a newline")
    lines = body[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError("the checkpoint body has fewer than three lines (origin, size, root)")
    origin, size_text, root_text, *extensions = lines
    if not origin:
        raise NoteError("the checkpoint's origin line is empty")
    # Decimal without sign or leading zeros: one spelling per size, so one signed text.
    if not size_text.isascii() or not size_text.isdigit() or size_text != str(int(size_text)):
        raise NoteError(f"the checkpoint's size line {size_text!r} is not a decimal number")
    try:
        root = base64.b64decode(root_text, validate=True)
    except (ValueError, binascii.Error):
        root = b""
    if len(root) != 32 or base64.b64encode(root).decode() != root_text:
        raise NoteError("the checkpoint's root line is not a base64 SHA-256 hash")
    if any(not ext for ext in extensions):
        raise NoteError("the checkpoint has an empty extension line")
    return Checkpoint(origin, int(size_text), root, tuple(extensions))


def parse_note(text: str) -> SignedNote:
    """Split a signed note into its body and signature lines (C2SP signed-note)."""
    if "\r" in text or any(ord(c) < 0x20 and c != "\n" for c in text):
        raise NoteError("the note holds control characters")
    split = text.rfind("\n\n")
    if split < 0:
        raise NoteError("the note has no signatures (no blank line after its body)")
    body, sig_block = text[: split + 1], text[split + 2 :]
    if not sig_block.endswith("\n"):
        raise NoteError("the note's last signature line does not end with a newline")
    sigs: list[Signature] = []
    for line in sig_block[:-1].split("\n"):
        if not line.startswith(_DASH):
            raise NoteError("a signature line does not start with an em dash and a space")
        name, _, blob_text = line[len(_DASH) :].partition(" ")
        try:
            blob = base64.b64decode(blob_text, validate=True)
        except (ValueError, binascii.Error):
            blob = b""
        if not name or " " in blob_text or len(blob) < 5:
            raise NoteError("a signature line is not `— NAME BASE64`")
        sigs.append(Signature(name, int.from_bytes(blob[:4], "big"), blob[4:]))
    if len(sigs) > _MAX_SIGNATURES:
        raise NoteError(f"the note has more than {_MAX_SIGNATURES} signatures")
    return SignedNote(body, tuple(sigs))


def sign_note(body: str, signers: Iterable[SignerKey]) -> str:
    """The note text: the body, a blank line and one signature line per signer."""
    out = [body, "\n"]
    for signer in signers:
        blob = signer.verifier.hash.to_bytes(4, "big") + signer.sign(body.encode())
        out.append(f"{_DASH}{signer.name} {base64.b64encode(blob).decode()}\n")
    return "".join(out)


def verify_note(text: str, keys: Iterable[VerifierKey]) -> tuple[Checkpoint, list[VerifierKey]]:
    """The checkpoint in ``text`` and the trusted keys that signed it (in ``keys`` order).

    Signatures by keys not in ``keys`` are ignored (C2SP: a note may carry other witnesses'
    signatures); a signature that names a trusted key (name and key hash) but does not verify
    fails the note, and so does a note no trusted key signed."""
    note = parse_note(text)
    checkpoint = parse_checkpoint(note.body)
    message = note.body.encode()
    signed: list[VerifierKey] = []
    for key in keys:
        for sig in note.signatures:
            if sig.name != key.name or sig.key_hash != key.hash:
                continue
            if not key.verify(message, sig.signature):
                raise NoteError(f"the signature by key {key.name}+{key.hash:08x} does not verify")
            if key not in signed:
                signed.append(key)
    if not signed:
        names = ", ".join(f"{s.name}+{s.key_hash:08x}" for s in note.signatures)
        raise NoteError(f"no trusted key signed it (signed by: {names or 'nobody'})")
    return checkpoint, signed
